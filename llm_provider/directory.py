"""The directory: where each node answers and the public key it signs with.

A JSON file `{name: {"url": URL, "public_key": KEY}}` and/or `--peer NAME=URL#KEY`.  A node run as
several replicas (router replicas sharing one database, name and key) lists each:
`{"urls": [URL, URL], ...}` or `--peer NAME=URL,URL#KEY`; senders use whichever answers.  The file
is read again when it changes, so nodes may join while others run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Peer:
    urls: tuple[str, ...]
    public_key: str | None = None

    @classmethod
    def at(cls, url: str, public_key: str | None = None) -> Peer:
        return cls((url.rstrip("/"),), public_key)

    @property
    def url(self) -> str:
        return self.urls[0]

    def as_json(self) -> dict[str, Any]:
        where: dict[str, Any] = {"url": self.url} if len(self.urls) == 1 else {"urls": list(self.urls)}
        return where | {"public_key": self.public_key}


def _peer(value: Any) -> Peer:
    if isinstance(value, str):
        return Peer.at(value)
    urls = value.get("urls") or value["url"]
    urls = [urls] if isinstance(urls, str) else urls
    return Peer(tuple(str(url).rstrip("/") for url in urls), public_key=value.get("public_key"))


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

    def names(self) -> list[str]:
        """Every node the directory knows."""
        self._reload()
        return sorted(self._fixed.keys() | self._from_file.keys())

    def _reload(self) -> None:
        if self._path is None or not self._path.exists():
            return
        mtime = self._path.stat().st_mtime
        if mtime != self._mtime:
            self._from_file = {str(name): _peer(value) for name, value in json.loads(self._path.read_text()).items()}
            self._mtime = mtime


def parse_peer(text: str) -> tuple[str, Peer]:
    """`NAME=URL[,URL...]#PUBLIC_KEY` (the key as `emulator node` logs it at boot)."""
    name, sep, rest = text.partition("=")
    where, _, key = rest.partition("#")
    urls = tuple(url.rstrip("/") for url in where.split(","))
    if not sep or not name or not all(url.startswith(("http://", "https://")) for url in urls):
        raise ValueError(f"expected NAME=URL[,URL...]#PUBLIC_KEY, got {text!r}")
    return name, Peer(urls, public_key=key or None)


def write_directory(path: Path, peers: dict[str, Peer]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({name: peer.as_json() for name, peer in peers.items()}, indent=2) + "\n")
    tmp.replace(path)
