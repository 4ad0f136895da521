"""Every message parses from the seed's JSON form, goes back to it unchanged, and exports a JSON Schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from handlers import admin
from handlers.errors import HandlerError
from schemas.messages import parse_message, to_wire

SEED_FORMS = [
    ("router", "StartRouter"),
    ("driver", {"SetRouter": {"node": "fake.dev"}}),
    ("openai", {"RegisterOaiProviderEndpoint": {"endpoint": "http://127.0.0.1:8080/v1"}}),
    ("openai", {"RegisterOaiProviderEndpoint": {"endpoint": "https://api.openai.com/v1", "api_key": "sk-x"}}),
    ("driver", {"SetLocalDriver": {"model": "llama3", "is_public": True}}),
    ("driver", {"SetLocalDriver": {"models": ["a", "b"], "is_public": False, "capacity": 2}}),
    ("router", {"SetBudget": {"client": "fake3.dev", "label": "alice", "daily_tokens": 5000}}),
    ("router", {"SetBudget": {"client": "fake3.dev"}}),
]


@pytest.mark.parametrize(("process", "wire"), SEED_FORMS)
def test_seed_forms_parse_and_round_trip(process: str, wire: object) -> None:
    command, message = admin.parse(wire, process)  # type: ignore[arg-type]
    assert command.process == process
    assert admin.parse(to_wire(message))[1] == message


def test_an_admin_message_is_refused_for_another_process() -> None:
    with pytest.raises(HandlerError) as refused:
        admin.parse("StartRouter", "driver")
    assert (refused.value.status, refused.value.code) == (422, "not_an_admin_message")


def test_admin_messages_are_not_messages_between_nodes() -> None:
    with pytest.raises(ValidationError):
        parse_message("router", "StartRouter")


@pytest.mark.parametrize(
    ("process", "wire"),
    [
        ("router", "Bogus"),
        ("driver", {"RunJob": {}}),
        ("driver", {"CancelJob": {"job_id": "x", "extra": 1}}),
        ("driver", "RegisterDriver"),  # a router message sent to the driver
    ],
)
def test_wrong_forms_are_refused(process: str, wire: object) -> None:
    with pytest.raises(ValidationError):
        parse_message(process, wire)  # type: ignore[arg-type]


def test_json_schemas_are_exported(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "schemas.export", str(tmp_path)], capture_output=True, text=True, check=True)
    assert "wrote" in result.stdout
    router = json.loads((tmp_path / "router_message.json").read_text())
    tags = {variant["properties"]["type"]["const"] for variant in router["$defs"].values() if "type" in variant.get("properties", {})}
    assert {"RunJob", "JobUpdate", "RegisterDriver"} <= tags
    admin_messages = json.loads((tmp_path / "admin_message.json").read_text())
    tags = {variant["properties"]["type"]["const"] for variant in admin_messages["$defs"].values() if "type" in variant.get("properties", {})}
    assert {"StartRouter", "SetRouter", "RegisterOaiProviderEndpoint"} <= tags
    assert (tmp_path / "JobUpdate.json").exists() and (tmp_path / "ChatCompletionChunk.json").exists()


@pytest.mark.parametrize("body", [{"type": ["StartRouter"]}, {"type": {"a": 1}}, {"type": None}, [], "Nonsense"])
def test_a_message_type_that_is_no_name_is_neither_admin_nor_counted_by_name(body: object) -> None:
    from llm_provider.http_api import _message_type

    assert admin.is_admin(body) is False
    assert _message_type({"body": body}) == "unknown"
