"""The directory: which URL each node name answers at.  A JSON file `{name: url}` and/or `--peer NAME=URL`."""

from __future__ import annotations

import json
from pathlib import Path


class Directory:
    """`peers` is kept by reference: a caller may add names to it while the node runs."""

    def __init__(self, peers: dict[str, str], path: Path | None = None) -> None:
        self._fixed = peers
        self._path = path
        self._from_file: dict[str, str] = {}
        self._mtime: float | None = None
        self._reload()

    def url(self, node: str) -> str | None:
        """The node's base URL; the file is read again when it changed, so nodes may join later."""
        if node not in self._fixed and node not in self._from_file:
            self._reload()
        return self._fixed.get(node) or self._from_file.get(node)

    def names(self) -> set[str]:
        self._reload()
        return set(self._fixed) | set(self._from_file)

    def _reload(self) -> None:
        if self._path is None or not self._path.exists():
            return
        mtime = self._path.stat().st_mtime
        if mtime != self._mtime:
            self._from_file = {str(k): str(v).rstrip("/") for k, v in json.loads(self._path.read_text()).items()}
            self._mtime = mtime


def parse_peer(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise ValueError(f"expected NAME=URL, got {text!r}")
    return name, url.rstrip("/")


def write_directory(path: Path, peers: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(peers, indent=2) + "\n")
    tmp.replace(path)
