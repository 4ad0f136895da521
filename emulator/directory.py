"""The directory: where each node answers and the public key it signs with.

A JSON file `{name: {"url": URL, "public_key": KEY}}` and/or `--peer NAME=URL#KEY`.  The file is
read again when it changes, so nodes may join while others run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Peer:
    url: str
    public_key: str | None = None


def _peer(value: Any) -> Peer:
    if isinstance(value, str):
        return Peer(url=value.rstrip("/"))
    return Peer(url=str(value["url"]).rstrip("/"), public_key=value.get("public_key"))


class Directory:
    """`peers` is kept by reference: a caller may add names to it while the node runs."""

    def __init__(self, peers: dict[str, Peer], path: Path | None = None) -> None:
        self._fixed = peers
        self._path = path
        self._from_file: dict[str, Peer] = {}
        self._mtime: float | None = None
        self._reload()

    def peer(self, node: str) -> Peer | None:
        if node not in self._fixed and node not in self._from_file:
            self._reload()
        return self._fixed.get(node) or self._from_file.get(node)

    def _reload(self) -> None:
        if self._path is None or not self._path.exists():
            return
        mtime = self._path.stat().st_mtime
        if mtime != self._mtime:
            self._from_file = {str(name): _peer(value) for name, value in json.loads(self._path.read_text()).items()}
            self._mtime = mtime


def parse_peer(text: str) -> tuple[str, Peer]:
    """`NAME=URL#PUBLIC_KEY` (the key as `emulator node` logs it at boot)."""
    name, sep, rest = text.partition("=")
    url, _, key = rest.partition("#")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise ValueError(f"expected NAME=URL#PUBLIC_KEY, got {text!r}")
    return name, Peer(url=url.rstrip("/"), public_key=key or None)


def write_directory(path: Path, peers: dict[str, Peer]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({name: asdict(peer) for name, peer in peers.items()}, indent=2) + "\n")
    tmp.replace(path)
