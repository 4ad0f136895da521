"""The hosts' entry points: `llm_provider.asgi:create_app` and `llm_provider.gunicorn:create_app`, and the
old names `emulator.asgi:create_app` and `emulator.gunicorn:create_app`, kept for deployments that name them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import emulator.asgi
import llm_provider.asgi

ROOT = Path(__file__).resolve().parent.parent


def test_emulator_asgi_create_app_is_llm_provider_asgi_create_app() -> None:
    assert emulator.asgi.create_app is llm_provider.asgi.create_app


def test_emulator_gunicorn_create_app_is_llm_provider_gunicorn_create_app(tmp_path: Path) -> None:
    # In a process of its own: importing the gunicorn host sets PROMETHEUS_MULTIPROC_DIR (`worker_metrics`) for the process.
    check = (
        "import emulator.gunicorn, llm_provider.gunicorn;"
        "assert emulator.gunicorn.create_app is llm_provider.gunicorn.create_app"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), "LLMP_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
