"""The peers our paths are measured against, each in a process of its own: the bare relay
(benchmarks/relay.py), the LiteLLM proxy, and the network of an older commit (a git worktree).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "llm-provider"
LITELLM_VENV = CACHE / "litellm-venv"
BASELINES = CACHE / "baselines"
STARTUP_S = 180.0


@contextmanager
def _process(command: list[str], **popen: object) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)  # type: ignore[call-overload]
    try:
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@asynccontextmanager
async def relay(port: int, upstream: str) -> AsyncIterator[tuple[str, int]]:
    """The bare pass-through: (its base URL, its pid)."""
    with _process([sys.executable, str(ROOT / "benchmarks" / "relay.py"), "--port", str(port), "--upstream", upstream]) as process:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise RuntimeError("the relay did not start")
        yield f"http://127.0.0.1:{port}", process.pid


def install_litellm() -> Path:
    """LiteLLM's proxy in a venv of its own (its pins would fight ours): installed once, then reused."""
    litellm = LITELLM_VENV / "bin" / "litellm"
    if not litellm.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return litellm


def litellm_version() -> str:
    result = subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "show", "litellm"], capture_output=True, text=True)
    return next((line.split()[1] for line in result.stdout.splitlines() if line.startswith("Version:")), "?")


@asynccontextmanager
async def litellm(port: int, upstream: str, model: str = "llama3") -> AsyncIterator[tuple[str, int]]:
    """The LiteLLM proxy, one worker, with one model pointed at `upstream`: (its base URL, its pid)."""
    binary = install_litellm()
    folder = Path(tempfile.mkdtemp(prefix="llmp-litellm-"))
    config = folder / "config.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {upstream}\n"
        "      api_key: none\n"
    )
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no internet: the cost map that ships with it
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",  # no key, as our loopback nodes take none
        "LITELLM_LOG": "ERROR",
    }
    command = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    with _process(command, env=env, cwd=folder) as process:
        url = f"http://127.0.0.1:{port}"
        await _wait_ready(url + "/health/liveliness", process)
        yield url, process.pid


async def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                output = process.stdout.read().decode(errors="replace") if process.stdout else ""
                raise RuntimeError(f"{url} exited with {process.returncode}: {output[-2000:]}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {STARTUP_S:.0f} s")


def worktree(commit: str) -> Path:
    """A checkout of `commit` beside this one's history, made once: the network as it was, to measure against."""
    path = BASELINES / commit
    if not (path / "emulator").exists():
        BASELINES.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--force", "--detach", str(path), commit], cwd=ROOT, check=True, capture_output=True)
    return path
