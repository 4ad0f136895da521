"""What the CLI does against a node's HTTP API: admin commands, running a job, reading usage."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import aiohttp

from emulator.arguments import CommandError
from schemas.sse import SSEDecoder

if TYPE_CHECKING:
    from schemas.messages import UiLoginCreated


def refusal(status: int, body: Any) -> CommandError:
    """An error answer as one readable line, with the fields at fault where the node named them."""
    error = body.get("error", {}) if isinstance(body, dict) else {}
    text = f"HTTP {status}: {error.get('message', body)}"
    details = error.get("details")
    if isinstance(details, list):
        text += "".join(f"; {'.'.join(map(str, d.get('loc', ())))}: {d.get('msg')}" for d in details if isinstance(d, dict))
    return CommandError(text)


async def send_admin(url: str, token: str, message: Any, process: str | None = None) -> dict[str, Any]:
    path = "/admin" if process is None else f"/admin/{process}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(url + path, json=message, headers={"Authorization": f"Bearer {token}"}) as response:
            body = await response.json(content_type=None)
            if response.status >= 400:
                raise refusal(response.status, body)
            return body  # type: ignore[no-any-return]


async def ui_login(url: str, token: str, valid_for: float = 600.0) -> UiLoginCreated:
    """A one-time login to the node's web page."""
    from schemas.messages import CreateUiLogin, UiLoginCreated, to_wire  # pydantic models: only this command needs them

    return UiLoginCreated.model_validate(await send_admin(url, token, to_wire(CreateUiLogin(valid_for=valid_for))))


async def fetch_usage(url: str, token: str, query: dict[str, str]) -> dict[str, Any]:
    """`GET /usage` with the admin token."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(url + "/usage", params=query, headers={"Authorization": f"Bearer {token}"}) as response:
            body = await response.json(content_type=None)
            if response.status >= 400:
                raise refusal(response.status, body)
            return body  # type: ignore[no-any-return]


@dataclass
class JobSummary:
    job_id: str
    status: str
    driver: str | None
    first_token_s: float | None
    total_s: float
    error: str | None

    def line(self) -> str:
        ttft = f"{self.first_token_s * 1000:.0f} ms" if self.first_token_s is not None else "-"
        text = f"job {self.job_id} · {self.status} · driver {self.driver or '-'} · first token {ttft} · total {self.total_s * 1000:.0f} ms"
        return text + (f" · error: {self.error}" if self.error else "")


async def run_job(url: str, request: dict[str, Any], out: TextIO = sys.stdout) -> JobSummary:
    """Submit a job, print its text as it streams, and sum it up."""
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as session:
        async with session.post(url + "/jobs", json=request) as response:
            body = await response.json(content_type=None)
            if response.status != 202:
                raise refusal(response.status, body)
        job_id = body["job_id"]
        try:
            final, first_token = await _print_stream(session, url + body["events_url"], out, started)
        except asyncio.CancelledError:  # Ctrl-C: the job is not wanted any more
            async with session.delete(f"{url}/jobs/{job_id}"):
                pass
            raise
    out.write("\n")
    return JobSummary(
        job_id=job_id,
        status=final.get("status", "lost"),
        driver=final.get("driver"),
        first_token_s=first_token,
        total_s=time.perf_counter() - started,
        error=final.get("error"),
    )


async def _print_stream(
    session: aiohttp.ClientSession, events_url: str, out: TextIO, started: float
) -> tuple[dict[str, Any], float | None]:
    """Print text as it comes, and tool calls once whole; the final update, and the seconds to the first token."""
    first_token: float | None = None
    decoder = SSEDecoder()
    chunks: list[dict[str, Any]] = []
    async with session.get(events_url) as events:
        async for raw in events.content:
            event = decoder.feed_line(raw.decode())
            if event is None or event.event != "job_update":
                continue
            update = json.loads(event.data)
            chunks.extend(update.get("chunks") or [])
            if update.get("delta") or update.get("chunks"):
                first_token = first_token or time.perf_counter() - started
            if update.get("delta"):
                out.write(update["delta"])
                out.flush()
            if update.get("is_final"):
                out.write("".join(f"\n{line}" for line in tool_call_lines(chunks)))
                return update, first_token
    return {"status": "lost", "error": "the stream ended without a final update"}, first_token


def tool_call_lines(chunks: list[dict[str, Any]]) -> list[str]:
    """Choice 0's tool calls, one readable line each: `→ get_weather({"city": "Paris"})  [call_1]`."""
    from handlers.assembly import assemble  # with the OpenAI schemas it reads: only run-job needs them
    from schemas.openai_api import JobKind

    answer = assemble(JobKind.CHAT, chunks, response_id="", created=0, model="")
    message = answer["choices"][0]["message"] if answer["choices"] else {}
    lines = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        lines.append(f"→ {function.get('name')}({function.get('arguments', '')})  [{call.get('id')}]")
    return lines


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def format_router_state(state: dict[str, Any]) -> str:
    """`emulator status`: a router's drivers, then its queues."""
    now = time.time()
    drivers: list[tuple[str, ...]] = [("DRIVER", "MODELS", "PUBLIC", "LOAD", "LAST SEEN", "COOLED DOWN")]
    for d in state["drivers"]:
        cooled = f"{d['cooled_down_until'] - now:.0f} s more" if d.get("cooled_down_until") else "-"
        drivers.append((d["node"], ",".join(d["models"]), "yes" if d["is_public"] else "no",
                        f"{d['load']}/{d['capacity']}", f"{now - d['last_seen']:.0f} s ago", cooled))
    queues: list[tuple[str, ...]] = [("MODEL", "QUEUED")] + [(m, str(n)) for m, n in sorted(state["queues"].items())]
    return _table(drivers) + "\n\n" + (_table(queues) if len(queues) > 1 else "no job waits")


def format_usage(report: dict[str, Any]) -> str:
    """`emulator usage`: jobs and tokens per day, role, client (and API key) and model; then the budgets."""
    rows: list[tuple[str, ...]] = [
        ("DAY", "ROLE", "CLIENT", "KEY", "MODEL", "JOBS", "PROMPT TOKENS", "COMPLETION TOKENS", "ESTIMATED")
    ]
    for row in report["usage"]:
        rows.append((
            row["day"], row["role"], row["client"], row.get("label") or "-", row["model"], str(row["jobs"]),
            str(row["prompt_tokens"]), str(row["completion_tokens"]),
            f"{row['estimated_jobs']} jobs" if row["estimated_jobs"] else "-",
        ))
    text = _table(rows) if len(rows) > 1 else "no usage recorded"
    if report.get("budgets"):
        budgets: list[tuple[str, ...]] = [("BUDGET", "DAILY TOKENS", "USED TODAY")]
        for budget in report["budgets"]:
            name = budget["client"] + (f"/{budget['label']}" if budget.get("label") else "")
            budgets.append((name, str(budget["daily_tokens"]), str(budget["used_today"])))
        text += "\n\n" + _table(budgets)
    return text
