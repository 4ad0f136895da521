"""A node's limits: one model, each default written once.

`llm_provider.settings` reads it the same way under every host, from command-line flags, `LLMP_*`
environment variables and a TOML file, in that order of precedence over these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _about(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass(frozen=True)
class Settings:
    job_timeout: float = field(default=60.0, metadata=_about("seconds from submission to a job's deadline, unless the job asks for another"))
    max_job_timeout: float = field(default=3600.0, metadata=_about("the longest deadline, in seconds, a job may ask for"))
    first_token_timeout: float | None = field(default=None, metadata=_about("seconds allowed until the first token"))
    idle_timeout: float | None = field(default=None, metadata=_about("longest silence between chunks, in seconds"))
    retention: float = field(default=24 * 3600.0, metadata=_about("seconds finished jobs are kept"))
    max_attempts: int = field(default=3, metadata=_about("drivers a router tries a job on before it fails the job"))
    drain_grace: float = field(default=10.0, metadata=_about("on SIGTERM, seconds running jobs may take to finish"))
    max_body_bytes: int = field(default=16 * 1024 * 1024, metadata=_about("largest request body a client may send (room for images sent inline)"))
    max_llm_event_bytes: int = field(
        default=8 * 1024 * 1024, metadata=_about("largest event a driver reads from its LLM's stream (a chunk is rarely over a few KiB)")
    )
    status_hold: float = field(
        default=10.0, metadata=_about("seconds a streamed /v1 answer waits for its first chunk, or a refusal, before it commits to 200")
    )
