"""The node's web page, `/ui`: what it reads over HTTP, who may read it, and the page itself in a real browser.

The HTTP tests run under every host; the browser tests under one (the page does not depend on the host),
in Debian's Chromium driven by Playwright (see tests/browser.py).  With LLMP_UI_SCREENSHOTS=DIR the
browser tests leave their screenshots there (the ones in docs/ were taken so).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from sqlalchemy import func, select, update

from schemas.sse import ServerSentEvent
from store.models import Job, UiLogin
from tests.browser import FOREIGN_HOST, headless_chromium
from tests.conftest import Network, StartNode, start_network
from tests.helpers import count_rows, get_json, store_of
from tests.helpers import migrated_database as migrated_database  # a fixture, used by start_node
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.streams import GUARD_S, events, submit
from tests.upstreams import MODEL, HeldUpstream, gated_upstream

QUESTION = "How much wood could a woodchuck chuck? Be concise."
FIRST, REST = "A woodchuck would chuck", " as much wood as a woodchuck could chuck."
BROWSER_GUARD_MS = 15_000  # the most the page may take to show what the test waits for: a guard against hangs only
SCREENSHOTS_ENV = "LLMP_UI_SCREENSHOTS"


@pytest.fixture
async def held() -> AsyncIterator[HeldUpstream]:
    """An upstream that streams FIRST, then holds every request until the test sets `gate`, then REST."""
    async with gated_upstream(first=FIRST, rest=REST) as upstream:
        yield upstream


@pytest.fixture
async def held_network(start_node: StartNode, held: HeldUpstream) -> Network:
    return await start_network(start_node, held)


@pytest.fixture
async def raw_http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps no cookies and follows no redirect on its own: the test handles both by hand."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60), cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def from_elsewhere(url: str, **headers: str) -> dict[str, str]:
    """Headers of a browser that asks for the node by a name that is not a loopback one."""
    return {"Host": f"{FOREIGN_HOST}:{port_of(url)}", **headers}


async def read(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    """Status, body (JSON if it is JSON, else text) and the response."""
    async with http.request(method, url, allow_redirects=False, **kwargs) as response:
        text = await response.text()
        body = json.loads(text) if response.content_type == "application/json" else text
        return response.status, body, response


async def next_event(stream: AsyncIterator[ServerSentEvent], kind: str) -> dict[str, Any]:
    """The stream's next `kind` event (comments and other kinds skipped)."""
    async with asyncio.timeout(GUARD_S):
        async for event in stream:
            if event.event == kind:
                body: dict[str, Any] = json.loads(event.data)
                return body
    raise AssertionError(f"the stream ended before a {kind} event")


async def logins_in_use(network: Network) -> int:
    async with store_of(network.client).reading() as session:
        return int(await session.scalar(select(func.count()).where(UiLogin.session_hash.is_not(None))) or 0)


# --- over HTTP, under every host ------------------------------------------------------------------


async def test_the_page_its_files_and_the_views_it_reads(network: Network, http: aiohttp.ClientSession) -> None:
    client = network.client
    status, page, response = await read(http, "GET", f"{client.url}/ui")
    assert status == 200 and response.headers["Content-Type"] == "text/html; charset=utf-8", (status, page)
    assert '<script src="/ui/static/app.js"' in page and "default-src 'self'" in response.headers["Content-Security-Policy"]
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, body, response = await read(http, "GET", f"{client.url}/ui/static/{name}")
        assert status == 200 and response.headers["Content-Type"].startswith(kind) and body, (name, status)
    status, body, _ = await read(http, "GET", f"{client.url}/ui/static/..%2fhttp_api.py")
    # aiohttp matches the route and the name is no file; an ASGI server decodes the path first, which then matches no route
    assert status == 404 and body["error"]["code"] in ("file_not_found", "not_found"), body

    # the network as each node sees it
    seen = await get_json(http, f"{client.url}/ui/api/network")
    assert (seen["node"], seen["roles"], seen["router"], seen["models"]) == ("fake3.dev", ["client"], "fake.dev", []), seen
    assert {n["name"]: n["roles"] for n in seen["nodes"]} == {"fake.dev": ["router"], "fake2.dev": ["driver"], "fake3.dev": ["client"]}
    [driver] = seen["drivers"]
    assert (driver["node"], driver["models"], driver["load"], driver["capacity"]) == ("fake2.dev", [MODEL], 0, 1), driver
    assert seen["queues"] == {} and seen["reachable_models"] == [MODEL] and seen["router_error"] is None, seen
    by_router = await get_json(http, f"{network.router.url}/ui/api/network")
    assert by_router["roles"] == ["router"] and [d["node"] for d in by_router["drivers"]] == ["fake2.dev"], by_router
    by_driver = await get_json(http, f"{network.driver.url}/ui/api/network")
    assert (by_driver["roles"], by_driver["models"], by_driver["capacity"]) == (["driver", "client"], [MODEL], 1), by_driver

    # the job list, live: a job run through the jobs API appears, and then its end
    async with http.get(f"{client.url}/ui/api/live") as live:
        assert live.status == 200 and live.headers["Content-Type"].startswith("text/event-stream")
        stream = aiter(events(live))
        assert (await next_event(stream, "jobs")) == {"jobs": []}
        live_driver = (await next_event(stream, "network"))["drivers"][0]
        assert {k: live_driver[k] for k in ("node", "models", "load")} == {k: driver[k] for k in ("node", "models", "load")}
        job_id = (await submit(http, client.url, {"model": MODEL, "prompt": QUESTION}))["job_id"]
        while True:
            listed = (await next_event(stream, "jobs"))["jobs"]
            assert [row["job_id"] for row in listed] == [job_id], listed
            if listed[0]["status"] == "succeeded":
                break
    record = await get_json(http, f"{client.url}/jobs/{job_id}")
    [row] = (await get_json(http, f"{client.url}/ui/api/jobs"))["jobs"]
    assert (row["client"], row["router"], row["driver"], row["model"]) == ("http:127.0.0.1", "fake.dev", "fake2.dev", MODEL), row
    assert row["tokens"] == record["usage"]["completion_tokens"] > 0 and row["first_token_at"] == record["first_token_at"], (row, record)
    assert row["created_at"] <= row["first_token_at"] <= row["finished_at"], row
    for limit in ("0", "201", "ten"):
        status, body, _ = await read(http, "GET", f"{client.url}/ui/api/jobs?limit={limit}")
        assert status == 400 and body["error"]["code"] == "bad_limit", body


async def test_from_elsewhere_the_page_needs_a_one_time_login_and_changes_need_its_csrf_token(
    held_network: Network, held: HeldUpstream, raw_http: aiohttp.ClientSession
) -> None:
    network, http = held_network, raw_http
    client = network.client
    url, away = client.url, from_elsewhere(client.url)

    # Asked for by another name (elsewhere, or a site whose name leads to 127.0.0.1), nothing is shown without a login.
    for path in ("/ui", "/ui/api/session", "/ui/api/network", "/ui/api/jobs", "/ui/api/live", "/ui/api/jobs/x"):
        status, body, _ = await read(http, "GET", url + path, headers=away)
        assert status == 401, (path, status, body)
        if path != "/ui":
            assert body["error"]["code"] == "ui_login_required", body
    _, page, _ = await read(http, "GET", f"{url}/ui", headers=away)
    assert "emulator ui -p PORT" in page, page

    # The login URL: refused without its token, with a wrong one; it works once, setting a strict, script-proof cookie.
    login = await client.admin({"CreateUiLogin": {}})
    assert login["path"].startswith("/ui/login?token="), login
    for path, expected in (("/ui/login", 400), ("/ui/login?token=guess", 403)):
        status, page, response = await read(http, "GET", url + path, headers=away)
        assert status == expected and "Set-Cookie" not in response.headers and "emulator ui -p PORT" in page, (path, status)
    assert await logins_in_use(network) == 0
    status, _, response = await read(http, "GET", url + login["path"], headers=away)
    assert status == 303 and response.headers["Location"] == "/ui", status
    set_cookie = response.headers["Set-Cookie"]
    name, _, rest = set_cookie.partition("=")
    value, *attributes = [part.strip() for part in rest.split(";")]
    assert name == "llmp_ui_fake3_dev" and {"HttpOnly", "SameSite=Strict", "Path=/ui"} <= set(attributes), set_cookie
    status, _, response = await read(http, "GET", url + login["path"], headers=away)
    assert status == 403 and "Set-Cookie" not in response.headers, "a login URL worked twice"
    assert await logins_in_use(network) == 1
    signed_in = from_elsewhere(url, Cookie=f"{name}={value}")
    status, _, _ = await read(http, "GET", f"{url}/ui", headers=signed_in)
    assert status == 200
    status, session, _ = await read(http, "GET", f"{url}/ui/api/session", headers=signed_in)
    assert session["access"] == "session" and session["node"] == "fake3.dev", session
    token = session["csrf_token"]
    loopback = await get_json(http, f"{url}/ui/api/session")
    assert loopback["access"] == "loopback" and loopback["csrf_token"] != token, loopback

    # The page takes no API key (an EventSource cannot send one): with keys required, the jobs API refuses, the page does not.
    await client.admin("RequireApiKeys")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}]}
    for headers in (signed_in, {**signed_in, "X-CSRF-Token": loopback["csrf_token"]}, {**signed_in, "X-CSRF-Token": ""}):
        status, body, _ = await read(http, "POST", f"{url}/ui/api/jobs", json=chat, headers=headers)
        assert status == 403 and body["error"]["code"] == "csrf_token_required", body
    writing = {**signed_in, "X-CSRF-Token": token}
    status, body, _ = await read(http, "POST", f"{url}/ui/api/jobs", json={"model": MODEL}, headers=writing)
    assert status == 422, body
    assert await count_rows(client, Job) == 0
    status, created, _ = await read(http, "POST", f"{url}/ui/api/jobs", json=chat, headers=writing)
    assert status == 202, created
    job_id = created["job_id"]
    status, body, _ = await read(http, "GET", f"{url}/jobs/{job_id}")
    assert status == 401 and body["error"]["code"] == "invalid_api_key", body
    async with http.get(f"{url}/ui/api/jobs/{job_id}/events", headers=signed_in) as stream:
        assert stream.status == 200
        first = await next_event(aiter(events(stream)), "job_update")
    assert first["delta"] == FIRST, first
    status, record, _ = await read(http, "GET", f"{url}/ui/api/jobs/{job_id}", headers=signed_in)
    assert (record["status"], record["client"]) == ("running", "ui"), record

    # Cancelling is a change too.
    status, body, _ = await read(http, "DELETE", f"{url}/ui/api/jobs/{job_id}", headers=signed_in)
    assert status == 403 and body["error"]["code"] == "csrf_token_required", body
    assert (await read(http, "GET", f"{url}/ui/api/jobs/{job_id}", headers=signed_in))[1]["status"] == "running"
    status, record, _ = await read(http, "DELETE", f"{url}/ui/api/jobs/{job_id}", headers=writing)
    assert status == 200 and record["status"] == "cancelled", record

    # A session ends when it expires; a cookie it did not set opens nothing; an unused login URL expires too.
    status, _, _ = await read(http, "GET", f"{url}/ui/api/session", headers=from_elsewhere(url, Cookie=f"{name}={value}x"))
    assert status == 401
    later = await client.admin({"CreateUiLogin": {"valid_for": 60}})
    async with store_of(client).writing() as session:
        await session.execute(update(UiLogin).values(expires_at=0.0))
    status, _, _ = await read(http, "GET", f"{url}/ui/api/session", headers=signed_in)
    assert status == 401
    status, _, response = await read(http, "GET", url + later["path"], headers=away)
    assert status == 403 and "Set-Cookie" not in response.headers
    status, body, _ = await read(http, "POST", f"{url}/admin", json={"CreateUiLogin": {"valid_for": 0}},
                                 headers={"Authorization": f"Bearer {client.node.home.admin_token()}"})
    assert status == 422, body


# --- in a browser, under one host ---------------------------------------------------------------


def screenshot_path(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


@pytest.mark.parametrize("node_setup", ["aiohttp"])
async def test_in_a_browser_the_page_shows_the_network_and_a_job_as_it_runs(
    held_network: Network, held: HeldUpstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    client = held_network.client
    async with headless_chromium() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 760})
        failures: list[str] = []
        page.on("pageerror", lambda error: failures.append(str(error)))
        page.on("console", lambda message: failures.append(message.text) if message.type == "error" else None)
        await page.goto(f"{client.url}/ui")

        load = page.locator('#drivers tr[data-driver="fake2.dev"] .load .figure')
        await expect(page.locator("#node-name")).to_have_text("fake3.dev", timeout=BROWSER_GUARD_MS)
        await expect(page.locator('#nodes tr[data-node="fake.dev"]')).to_contain_text("router", timeout=BROWSER_GUARD_MS)
        await expect(page.locator('#nodes tr[data-node="fake2.dev"]')).to_contain_text("driver")
        await expect(page.locator('#drivers tr[data-driver="fake2.dev"] .models')).to_have_text(MODEL)
        await expect(load).to_have_text("0/1")
        await expect(page.locator("#chat-model")).to_have_value(MODEL)
        await page.evaluate("window.sameDocument = true")  # gone if the page reloads

        # A job submitted elsewhere shows up, and the driver's load with it, without a reload.
        job_id = (await submit(http, client.url, {"model": MODEL, "prompt": QUESTION}))["job_id"]
        row = page.locator(f'#jobs tr[data-job-id="{job_id}"]')
        await expect(row).to_have_attribute("data-status", "running", timeout=BROWSER_GUARD_MS)
        await expect(row.locator(".client")).to_have_text("http:127.0.0.1")
        await expect(load).to_have_text("1/1", timeout=BROWSER_GUARD_MS)
        await page.screenshot(path=screenshot_path(tmp_path, "ui-overview.png"))

        # Its own page: the text so far, then the rest as it comes, and the timeline.
        await row.click()
        text = page.locator("#job-text")
        await expect(text).to_have_text(FIRST, timeout=BROWSER_GUARD_MS)
        await expect(page.locator("#job-status")).to_have_text("running")
        held.gate.set()
        await expect(text).to_have_text(FIRST + REST, timeout=BROWSER_GUARD_MS)
        await expect(page.locator("#job-status")).to_have_text("succeeded", timeout=BROWSER_GUARD_MS)
        await expect(text.locator(".chunk")).to_have_count(2)
        timeline = page.locator("#job-timeline")
        await expect(timeline).to_contain_text("routed by fake.dev")
        await expect(timeline).to_contain_text("first token from fake2.dev")
        await expect(timeline).to_contain_text("succeeded (stop)")
        await page.screenshot(path=screenshot_path(tmp_path, "ui-job.png"))

        await page.go_back()
        await expect(row).to_have_attribute("data-status", "succeeded", timeout=BROWSER_GUARD_MS)
        await expect(load).to_have_text("0/1", timeout=BROWSER_GUARD_MS)
        assert await page.evaluate("window.sameDocument === true"), "the page reloaded"
        assert failures == [], failures


@pytest.mark.parametrize("node_setup", ["aiohttp"])
async def test_in_a_browser_let_in_by_a_login_url_the_chat_box_streams_its_answer(
    held_network: Network, held: HeldUpstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    client = held_network.client
    away = f"http://{FOREIGN_HOST}:{port_of(client.url)}"
    async with headless_chromium() as browser:
        context = await browser.new_context(viewport={"width": 1280, "height": 760})
        page = await context.new_page()
        failures: list[str] = []
        page.on("pageerror", lambda error: failures.append(str(error)))

        refused = await page.goto(f"{away}/ui")
        assert refused is not None and refused.status == 401
        await expect(page.locator("#refusal")).to_contain_text("login URL")
        login = await client.admin({"CreateUiLogin": {}})
        await page.goto(away + login["path"])
        assert page.url == f"{away}/ui", page.url
        [cookie] = await context.cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == ("llmp_ui_fake3_dev", True, "Strict", "/ui")
        await expect(page.locator("#connection")).to_have_text("live", timeout=BROWSER_GUARD_MS)
        await expect(page.locator("#chat-model")).to_have_value(MODEL, timeout=BROWSER_GUARD_MS)

        await page.fill("#chat-input", QUESTION)
        await page.press("#chat-input", "Enter")
        await expect(page.locator(".message.user")).to_have_text(QUESTION)
        answer = page.locator(".message.assistant")
        # The upstream holds the rest: what shows is the part that streamed.
        await expect(answer).to_have_text(FIRST, timeout=BROWSER_GUARD_MS)
        await expect(answer).to_have_class(re.compile(r"\bstreaming\b"))
        job_link = page.locator(".message-meta a")
        job_id = (await job_link.get_attribute("href") or "").removeprefix("#/jobs/")
        record = await get_json(http, f"{client.url}/jobs/{job_id}")
        assert (record["status"], record["client"], record["text"]) == ("running", "ui", FIRST), record
        await expect(page.locator(f'#jobs tr[data-job-id="{job_id}"] .client')).to_have_text("ui", timeout=BROWSER_GUARD_MS)
        await expect(page.locator('#drivers tr[data-driver="fake2.dev"] .load .figure')).to_have_text("1/1", timeout=BROWSER_GUARD_MS)
        await expect(page.locator("#chat-send")).to_be_disabled()  # one question at a time, news of the network or not
        await page.screenshot(path=screenshot_path(tmp_path, "ui-chat.png"))

        held.gate.set()
        await expect(answer).to_have_text(FIRST + REST, timeout=BROWSER_GUARD_MS)
        await expect(answer).not_to_have_class(re.compile(r"\bstreaming\b"))
        await expect(page.locator(".message-meta")).to_contain_text("succeeded")
        await expect(page.locator("#chat-send")).to_be_enabled()
        record = await get_json(http, f"{client.url}/jobs/{job_id}")
        assert (record["status"], record["text"]) == ("succeeded", FIRST + REST), record
        assert failures == [], failures
