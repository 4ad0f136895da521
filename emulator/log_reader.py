"""`emulator logs NODE [-f]`: print a node's log, found by name among the homes under --root."""

from __future__ import annotations

import asyncio
import codecs
import sys
from pathlib import Path
from typing import TextIO

from emulator.arguments import CommandError
from llm_provider.homes import Home

FOLLOW_POLL_S = 0.2  # a file that grows sends no event to wait on (without inotify): `logs -f` looks again this often


async def show(root: Path, node: str, follow: bool, out: TextIO = sys.stdout) -> None:
    """Print the log of node `node` (its home under `root`); with `follow`, go on printing what it logs."""
    path = Home(root / node).log_file
    if not path.is_file():
        found = sorted(home.parent.name for home in root.glob("*/node.log"))
        listing = f"; nodes with logs: {', '.join(found)}" if found else ""
        raise CommandError(f"no log of a node {node!r} under {root}{listing}")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a read may end inside a character
    with path.open("rb") as log:
        while True:
            chunk = log.read(64 * 1024)
            if chunk:
                out.write(decoder.decode(chunk))
                continue
            out.flush()
            if not follow:
                return
            if path.stat().st_size < log.tell():  # the file was truncated or replaced: start again from its beginning
                log.seek(0)
            await asyncio.sleep(FOLLOW_POLL_S)
