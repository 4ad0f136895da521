"""A node's home folder: its database, log, admin and metrics tokens, and a note of where it listens."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT_ENV = "LLM_PROVIDER_ROOT"


def default_root() -> Path:
    return Path(os.environ.get(DEFAULT_ROOT_ENV) or Path.home() / ".llm-provider")


def home_from_environment(environ: Mapping[str, str]) -> Path:
    """The home of a node started by a server's factory: LLMP_HOME, else ~/.llm-provider/LLMP_NAME."""
    return Path(environ.get("LLMP_HOME", str(Path.home() / ".llm-provider" / environ["LLMP_NAME"]))).expanduser()


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
    def metrics_token_file(self) -> Path:
        return self.path / "metrics_token"

    @property
    def metrics_directory(self) -> Path:
        """Where the node's worker processes count their metrics together (`llm_provider.worker_metrics`)."""
        return self.path / "metrics"

    @property
    def key_file(self) -> Path:
        return self.path / "node_key.pem"

    @property
    def info_file(self) -> Path:
        return self.path / "node.json"

    def admin_token(self) -> str:
        """The node's admin token, made on first boot and readable only by its owner."""
        if not self.token_file.exists():
            create_once(self.token_file, secrets.token_urlsafe(32).encode())
        return self.token_file.read_text().strip()

    def metrics_token(self) -> str:
        """The node's read-only token for /metrics from outside loopback, made on first boot like the admin token."""
        if not self.metrics_token_file.exists():
            create_once(self.metrics_token_file, secrets.token_urlsafe(32).encode())
        return self.metrics_token_file.read_text().strip()

    def write_info(self, name: str, url: str) -> None:
        self.info_file.write_text(json.dumps({"name": name, "url": url, "pid": os.getpid()}) + "\n")


def create_once(path: Path, data: bytes) -> None:
    """Write a file only its owner may read, unless it exists.  Processes of one node may boot
    together (gunicorn workers, replicas): the first file made stands, and none is seen half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    try:
        os.link(partial, path)  # atomic, and never over what another process made first
    except FileExistsError:
        pass
    finally:
        partial.unlink()


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
