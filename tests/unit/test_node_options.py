"""A node's options without a node: the LLMP_* variables a host's factory reads."""

from __future__ import annotations

from pathlib import Path

from handlers.settings import Settings
from llm_provider.log_format import LogFormat
from llm_provider.node import NodeOptions


def test_a_name_alone_gives_the_defaults() -> None:
    options = NodeOptions.from_environment({"LLMP_NAME": "fake2.dev"})
    assert (options.name, options.port, options.host) == ("fake2.dev", 8081, "127.0.0.1")
    assert options.home == Path.home() / ".llm-provider" / "fake2.dev"
    assert (options.directory_file, options.database_url, options.shared) == (None, None, False)
    assert options.settings == Settings()
    assert options.log_format is LogFormat.TEXT


def test_every_variable_is_read(tmp_path: Path) -> None:
    options = NodeOptions.from_environment({
        "LLMP_NAME": "fake3.dev", "LLMP_HOME": str(tmp_path / "home"), "LLMP_PORT": "9000", "LLMP_HOST": "0.0.0.0",
        "LLMP_DIRECTORY": str(tmp_path / "directory.json"), "LLMP_DATABASE_URL": "postgresql+asyncpg://db/x",
        "LLMP_SHARED": "1", "LLMP_JOB_TIMEOUT": "2.5", "LLMP_MAX_BODY_BYTES": "1024", "LLMP_MAX_LLM_EVENT_BYTES": "2048",
        "LLMP_LOG_FORMAT": "json",
    })
    assert (options.port, options.host, options.home) == (9000, "0.0.0.0", tmp_path / "home")
    assert (options.directory_file, options.database_url) == (tmp_path / "directory.json", "postgresql+asyncpg://db/x")
    assert options.shared is True and options.log_format is LogFormat.JSON
    assert options.settings == Settings(job_timeout=2.5, max_body_bytes=1024, max_llm_event_bytes=2048)
