"""A node's home folder: its database, log, admin token and a note of where it listens."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT_ENV = "LLM_PROVIDER_ROOT"


def default_root() -> Path:
    return Path(os.environ.get(DEFAULT_ROOT_ENV) or Path.home() / ".llm-provider")


@dataclass(frozen=True)
class Home:
    path: Path

    @property
    def database(self) -> Path:
        return self.path / "node.db"

    @property
    def log_file(self) -> Path:
        return self.path / "node.log"

    @property
    def token_file(self) -> Path:
        return self.path / "admin_token"

    @property
    def key_file(self) -> Path:
        return self.path / "node_key.pem"

    @property
    def info_file(self) -> Path:
        return self.path / "node.json"

    def admin_token(self) -> str:
        """The node's admin token, made on first boot and readable only by its owner."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.token_file.exists():
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_urlsafe(32))
        return self.token_file.read_text().strip()

    def write_info(self, name: str, url: str) -> None:
        self.info_file.write_text(json.dumps({"name": name, "url": url, "pid": os.getpid()}) + "\n")


def find_home(root: Path, port: int) -> Home | None:
    """The home of the node that last said it listens on `port`."""
    for info_file in sorted(root.glob("*/node.json")):
        try:
            info = json.loads(info_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if str(info.get("url", "")).endswith(f":{port}"):
            return Home(info_file.parent)
    return None
