"""What the `emulator` command reads from its own command line, and how it refuses: light enough for `--help`."""

from __future__ import annotations

import json
from typing import Any


class CommandError(Exception):
    """A refusal worth printing as it is, without a traceback."""


def parse_message_arg(text: str) -> Any:
    """`StartRouter` or `'{"SetRouter": {"node": "fake.dev"}}'`, as typed on the command line."""
    stripped = text.strip()
    if stripped.startswith(("{", '"')):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as error:
            raise CommandError(f"not valid JSON: {error}") from error
    return stripped
