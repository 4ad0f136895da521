"""The node's web page, `/ui`: its files, and the read-only JSON and event streams it reads.

Who may see it: a browser on the node's machine that asks for the node by a loopback name
(`127.0.0.1`, `localhost`, `[::1]`); anyone else only with the session cookie a one-time login
URL sets (`CreateUiLogin`, printed by `emulator ui -p PORT` and `emulator up`).  The Host header is
checked as well as the address, so a web site that rebinds its own name to 127.0.0.1 is refused.

The page's calls that change something (run a job, cancel one) carry the CSRF token of
`GET /ui/api/session` in `X-CSRF-Token`: a page of another site can neither read that token nor
send the header.  Jobs run from the page are the client `ui`, a name no HTTP client of the jobs
API can take (theirs are `key:<label>` or `http:<address>`).  The page's routes take no API key:
`EventSource` cannot send one, and the page has access of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from importlib import resources

from handlers import ui, ui_logins
from handlers.api_keys import Caller
from handlers.errors import ErrorCode, HandlerError
from llm_provider import http_api
from llm_provider.http_api import ContentReply, HttpRequest, NodeApi, Reply, Route, StreamReply, json_reply
from schemas.sse import encode_comment, encode_event
from schemas.ui import JobList, UiAccess, UiSession

ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
CSRF_HEADER = "x-csrf-token"
MAX_JOBS = 200
PAGE_HEADERS = {
    # Only the node's own files, no inline script, never inside another site's frame.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Visitor:
    """A browser let in, and what its CSRF token is made from."""

    access: UiAccess
    key: str  # "loopback", or the digest of its session cookie


def is_local(remote: str, host_header: str) -> bool:
    """From this machine, and asking for it by a loopback name (not another site's name bound to 127.0.0.1)."""
    return _is_loopback(remote) and _is_loopback(_host_name(host_header))


def _is_loopback(name: str) -> bool:
    if name.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback


def _host_name(host: str) -> str:
    """`127.0.0.1:8081` → `127.0.0.1`; `[::1]:8081` → `::1`."""
    if host.startswith("["):
        return host[1:host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def cookie_name(api: NodeApi) -> str:
    """One per node: browsers send a host's cookies to every port of it, where other nodes may listen."""
    return "llmp_ui_" + re.sub(r"[^A-Za-z0-9]", "_", api.ctx.name)


def _cookie(api: NodeApi, request: HttpRequest) -> str | None:
    try:
        morsel = SimpleCookie(request.headers.get("cookie", "")).get(cookie_name(api))
    except CookieError:
        return None
    return morsel.value if morsel is not None else None


async def visitor(api: NodeApi, request: HttpRequest) -> Visitor:
    """The browser's access to the page, or 401."""
    if is_local(request.remote, request.headers.get("host", "")):
        return Visitor(UiAccess.LOOPBACK, "loopback")
    cookie = _cookie(api, request)
    if cookie and (key := await ui_logins.session_key(api.ctx, cookie)) is not None:
        return Visitor(UiAccess.SESSION, key)
    raise HandlerError(
        401, ErrorCode.UI_LOGIN_REQUIRED,
        f"this page is open on {api.ctx.name}'s own machine; from elsewhere, open a login URL from `emulator ui -p PORT` first",
    )


def csrf_token(api: NodeApi, visitor: Visitor) -> str:
    """Made from the admin token, so every process of the node makes the same, and nothing is stored."""
    return hmac.new(api.admin_token.encode(), f"ui-csrf:{visitor.key}".encode(), hashlib.sha256).hexdigest()


async def changing_visitor(api: NodeApi, request: HttpRequest) -> Visitor:
    """A visitor whose call changes something: it must carry its CSRF token, or 403."""
    found = await visitor(api, request)
    presented = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(presented.encode(), csrf_token(api, found).encode()):
        raise HandlerError(403, ErrorCode.CSRF_TOKEN_REQUIRED, "a call from the page that changes something carries X-CSRF-Token (GET /ui/api/session)")
    return found


# --- the page ------------------------------------------------------------------------------------


def _file(name: str) -> bytes:
    return resources.files("llm_provider").joinpath("ui", name).read_bytes()


def _html(status: int, body: bytes) -> ContentReply:
    return ContentReply(status, body, "text/html; charset=utf-8", dict(PAGE_HEADERS))


def _refusal_page(error: HandlerError) -> ContentReply:
    return _html(error.status, _file("refused.html").replace(b"{message}", html.escape(error.message).encode()))


async def page(api: NodeApi, request: HttpRequest) -> Reply:
    try:
        await visitor(api, request)
    except HandlerError as error:
        return _refusal_page(error)
    return _html(200, _file("index.html"))


async def asset(api: NodeApi, request: HttpRequest) -> Reply:
    """The page's script and style sheet (not secret: they come with the package)."""
    name = request.params["name"]
    if name not in ASSETS:
        raise HandlerError(404, ErrorCode.FILE_NOT_FOUND, f"no file {name!r}")
    return ContentReply(200, _file(name), ASSETS[name], {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


async def log_in(api: NodeApi, request: HttpRequest) -> Reply:
    """`/ui/login?token=...`: spends the token, sets the session cookie and goes on to the page."""
    token = request.query.get("token", "")
    try:
        if not token:
            raise HandlerError(400, ErrorCode.TOKEN_REQUIRED, "the login URL lacks its token: /ui/login?token=...")
        cookie = await ui_logins.log_in(api.ctx, token)
    except HandlerError as error:
        return _refusal_page(error)
    attributes = f"HttpOnly; SameSite=Strict; Path=/ui; Max-Age={ui_logins.SESSION_S:.0f}"
    return ContentReply(303, b"", "text/plain", {"Location": "/ui", "Set-Cookie": f"{cookie_name(api)}={cookie}; {attributes}", **PAGE_HEADERS})


# --- what the page reads ---------------------------------------------------------------------------


async def session(api: NodeApi, request: HttpRequest) -> Reply:
    found = await visitor(api, request)
    return json_reply(UiSession(node=api.ctx.name, access=found.access, csrf_token=csrf_token(api, found)))


async def network(api: NodeApi, request: HttpRequest) -> Reply:
    await visitor(api, request)
    return json_reply(await ui.network(api.ctx, api.directory.names()))


async def jobs(api: NodeApi, request: HttpRequest) -> Reply:
    await visitor(api, request)
    raw = request.query.get("limit", str(ui.RECENT_JOBS))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_JOBS:
        raise HandlerError(400, ErrorCode.BAD_LIMIT, f"limit must be a whole number from 1 to {MAX_JOBS}, got {raw!r}")
    listing: JobList = await ui.recent_jobs(api.ctx, int(raw))
    return json_reply(listing)


async def live(api: NodeApi, request: HttpRequest) -> Reply:
    """`network` and `jobs` events, each the whole view, whenever it changes."""
    await visitor(api, request)

    async def chunks() -> AsyncIterator[bytes]:
        yield f"retry: {http_api.SSE_RETRY_MS}\n\n".encode()
        async for news in ui.live(api.ctx, api.directory.names):
            yield encode_comment("heartbeat") if news is None else encode_event(news[1], event=news[0])

    return StreamReply(chunks())


async def job(api: NodeApi, request: HttpRequest) -> Reply:
    await visitor(api, request)
    return await http_api.job_record(api, request)


async def job_events(api: NodeApi, request: HttpRequest) -> Reply:
    await visitor(api, request)
    return await http_api.job_stream(api, request)


# --- what the page changes -------------------------------------------------------------------------


async def run_job(api: NodeApi, request: HttpRequest) -> Reply:
    """The chat box: a job like `POST /jobs`, whose client is `ui`."""
    await changing_visitor(api, request)
    return await http_api.submit_as(api, request, Caller(bearer=None, address=request.remote, is_ui=True))


async def cancel_job(api: NodeApi, request: HttpRequest) -> Reply:
    await changing_visitor(api, request)
    return await http_api.cancel(api, request)


ROUTES: list[tuple[str, str, Route]] = [
    ("GET", "/ui", page),
    ("GET", "/ui/", page),
    ("GET", "/ui/static/{name}", asset),
    ("GET", "/ui/login", log_in),
    ("GET", "/ui/api/session", session),
    ("GET", "/ui/api/network", network),
    ("GET", "/ui/api/jobs", jobs),
    ("GET", "/ui/api/live", live),
    ("POST", "/ui/api/jobs", run_job),
    ("GET", "/ui/api/jobs/{job_id}", job),
    ("DELETE", "/ui/api/jobs/{job_id}", cancel_job),
    ("GET", "/ui/api/jobs/{job_id}/events", job_events),
]
