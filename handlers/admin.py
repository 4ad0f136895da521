"""Admin messages: commands a node takes only from its owner (its admin token), never from another node.

ADMIN_COMMANDS is the one table of them: the message, the process it is about, and the handler that
carries it out.  Adding an admin message is one model in `schemas.messages` and one row here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from handlers import driver, openai, router
from handlers.context import NodeContext
from handlers.errors import ErrorCode, HandlerError
from schemas.messages import (
    CreateApiKey,
    CreateUiLogin,
    Message,
    Process,
    RegisterOaiProviderEndpoint,
    RequireApiKeys,
    RevokeApiKey,
    RouterStatus,
    SetBudget,
    SetGate,
    SetJobTimeout,
    SetLocalDriver,
    SetRouter,
    StartRouter,
    message_name,
    message_union,
    name_of,
    untag,
)

AdminHandler = Callable[[NodeContext, Any], Awaitable[BaseModel]]  # (context, the message) → the reply


@dataclass(frozen=True)
class AdminCommand:
    message: type[Message]
    process: Process
    handle: AdminHandler

    @property
    def name(self) -> str:
        return message_name(self.message)


ADMIN_COMMANDS: dict[str, AdminCommand] = {
    command.name: command
    for command in (
        AdminCommand(StartRouter, "router", router.start),
        AdminCommand(SetGate, "router", router.set_gate),
        AdminCommand(SetBudget, "router", router.set_budget),
        AdminCommand(RouterStatus, "router", router.status),
        AdminCommand(SetRouter, "driver", driver.set_router),
        AdminCommand(SetLocalDriver, "driver", driver.set_local_driver),
        AdminCommand(SetJobTimeout, "driver", driver.set_job_timeout),
        AdminCommand(RequireApiKeys, "driver", driver.require_api_keys),
        AdminCommand(CreateApiKey, "driver", driver.create_api_key),
        AdminCommand(RevokeApiKey, "driver", driver.revoke_api_key),
        AdminCommand(CreateUiLogin, "driver", driver.create_ui_login),
        AdminCommand(RegisterOaiProviderEndpoint, "openai", openai.register_endpoint),
    )
}

# Any admin message, for the HTTP API's documentation.
AdminMessage = message_union(*(command.message for command in ADMIN_COMMANDS.values()))


def is_admin(raw: Any) -> bool:
    """Whether wire JSON names an admin message."""
    return name_of(raw) in ADMIN_COMMANDS


def parse(raw: Any, target: Process | None = None) -> tuple[AdminCommand, Message]:
    """Wire JSON (the seed's form, or `{"type": NAME, ...}`) → the admin command and its message.  `target`, where
    the sender named the process, must be the one the command is about."""
    name = name_of(raw)
    command = None if name is None else ADMIN_COMMANDS.get(name)
    if command is None:
        expected = ", ".join(ADMIN_COMMANDS)
        raise HandlerError(422, ErrorCode.NOT_AN_ADMIN_MESSAGE, f"not an admin message; expected one of {expected}")
    if target is not None and target != command.process:
        raise HandlerError(422, ErrorCode.NOT_AN_ADMIN_MESSAGE, f"{name} is an admin message of the {command.process} process, not of {target}")
    return command, command.message.model_validate(untag(raw))


async def run(ctx: NodeContext, target: Process | None, raw: Any) -> BaseModel:
    """An admin command, already authenticated as coming from the node's owner."""
    command, message = parse(raw, target)
    return await command.handle(ctx, message)
