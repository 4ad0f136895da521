"""Admin messages are declared in one table (`handlers.admin.ADMIN_COMMANDS`): a message added there alone
is taken from the node's owner, and refused from other nodes."""

from __future__ import annotations

from typing import Literal

import pytest

from handlers import admin
from handlers.admin import AdminCommand
from handlers.context import NodeContext
from schemas.messages import Ack, Message
from tests.conftest import StartNode


class Ping(Message):
    type: Literal["Ping"] = "Ping"
    note: str


async def ping(ctx: NodeContext, message: Ping) -> Ack:
    return Ack(note=f"{ctx.name}: {message.note}")


@pytest.mark.parametrize("node_setup", ["aiohttp"])
async def test_an_admin_message_added_to_the_table_alone_is_sent_and_answered(
    start_node: StartNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(admin.ADMIN_COMMANDS, "Ping", AdminCommand(Ping, "driver", ping))
    node = await start_node("pinged.dev")

    assert await node.admin({"Ping": {"note": "hello"}}) == {"ok": True, "note": "pinged.dev: hello"}
    assert await node.admin({"type": "Ping", "note": "again"}, "driver") == {"ok": True, "note": "pinged.dev: again"}
