"""Refusals: every bad request answers the one JSON error shape with the right status, and stores nothing."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from sqlalchemy import select

from handlers.config import read_config
from handlers.settings import Settings
from llm_provider.signing import SIGNATURE_HEADER, NodeKey
from schemas.sse import ServerSentEvent
from store.models import Job, JobChunk, RoutedJob, ServedJob
from tests.conftest import Network, RunningNode, StartNode
from tests.helpers import assert_error_body, count_rows, get_json, store_of
from tests.helpers import gated_network as gated_network  # a fixture
from tests.helpers import migrated_database as migrated_database  # a fixture, used by start_node
from tests.helpers import start_node as start_node  # a fixture: conftest's, on copies of a migrated database
from tests.streams import GUARD_S, job_stream, job_updates, next_update, run_job, submit, updates_to_final
from tests.upstreams import MODEL, HeldUpstream
from tests.upstreams import gated as gated  # a fixture

ONE_MIB = 1024 * 1024


async def post_raw(
    http: aiohttp.ClientSession, url: str, data: bytes, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    """POST raw bytes; the status and the decoded JSON body (the error shape must be JSON)."""
    async with http.post(url, data=data, headers={"Content-Type": "application/json", **(headers or {})}) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()


async def post_json(http: aiohttp.ClientSession, url: str, body: Any, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    return await post_raw(http, url, json.dumps(body).encode(), headers)


async def assert_no_jobs_anywhere(network: Network) -> None:
    assert await count_rows(network.client, Job) == 0
    assert await count_rows(network.client, JobChunk) == 0
    assert await count_rows(network.driver, Job) == 0
    assert await count_rows(network.driver, ServedJob) == 0
    assert await count_rows(network.router, RoutedJob) == 0
    assert network.upstream.stats.requests == 0


def envelope(source_node: str, source_process: str, target: str, body: Any) -> dict[str, Any]:
    return {
        "source": {"node": source_node, "process": source_process},
        "target": target,
        "sent_at": time.time(),
        "nonce": secrets.token_hex(16),
        "body": body,
    }


def sign(signer: RunningNode, data: bytes) -> str:
    """Sign with the Ed25519 key in the signer's home, as its transport does."""
    return NodeKey.load_or_create(signer.node.home.key_file).sign(data)


async def post_envelope(
    http: aiohttp.ClientSession, to: RunningNode, raw: dict[str, Any], signer: RunningNode | None
) -> tuple[int, Any]:
    """POST /node/message, signed with `signer`'s key (None: unsigned) whatever node the envelope claims."""
    raw = {"destination": to.name, **raw}
    data = json.dumps(raw).encode()
    headers = {SIGNATURE_HEADER: sign(signer, data)} if signer is not None else {}
    return await post_raw(http, f"{to.url}/node/message", data, headers)


def job_spec(job_id: str, client_node: str, model: str = MODEL) -> dict[str, Any]:
    now = time.time()
    return {
        "job_id": job_id,
        "client_node": client_node,
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "created_at": now,
        "deadline": now + 60,
    }


async def node_config(node: RunningNode) -> dict[str, Any]:
    async with store_of(node).reading() as session:
        config = await read_config(session)
        return {
            "is_router": config.is_router,
            "router_node": config.router_node,
            "driver_models": list(config.driver_models),
            "llm_endpoint": config.llm_endpoint,
        }


# --- POST /jobs --------------------------------------------------------------------------------


MALFORMED = {
    "unclosed-object": b"{",
    "not-json": b"not json",
    "trailing-comma": b'{"model": "llama3",}',
    "not-utf8": b"\xff\xfe\x00",
    "empty-body": b"",
}

# The network validates only what it needs itself (a JSON object, a model, messages with roles, its own
# fields' types); ranges and enumerations are the LLM's to check (`test_openai_fidelity.py`).
WRONG_JOB_FIELDS: dict[str, Any] = {
    "missing-model": {"prompt": "hi"},
    "prompt-and-messages": {"model": MODEL, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
    "neither-prompt-nor-messages": {"model": MODEL},
    "empty-messages": {"model": MODEL, "messages": []},
    "message-without-role": {"model": MODEL, "messages": [{"content": "hi"}]},
    "message-not-object": {"model": MODEL, "messages": ["hi"]},
    "role-not-string": {"model": MODEL, "messages": [{"role": 7, "content": "hi"}]},
    "content-not-text-or-parts": {"model": MODEL, "messages": [{"role": "user", "content": 42}]},
    "negative-timeout": {"model": MODEL, "prompt": "hi", "timeout": -1},
    "timeout-not-number": {"model": MODEL, "prompt": "hi", "timeout": "soon"},
    "empty-model": {"model": "", "prompt": "hi"},
    "model-not-string": {"model": 3, "prompt": "hi"},
    "prompt-not-string": {"model": MODEL, "prompt": 42},
    "array-not-object": [{"model": MODEL, "prompt": "hi"}],
    "null-body": None,
}


async def test_malformed_json_is_400_and_stores_nothing(network: Network, http: aiohttp.ClientSession, subtests: Any) -> None:
    for name, raw in MALFORMED.items():
        with subtests.test(msg=name):
            status, body = await post_raw(http, f"{network.client.url}/jobs", raw)
            assert status == 400
            error = assert_error_body(body, "malformed_json")
            assert error["type"] == "invalid_request_error"
    await assert_no_jobs_anywhere(network)


async def test_wrong_fields_are_422_and_store_nothing(network: Network, http: aiohttp.ClientSession, subtests: Any) -> None:
    for name, job in WRONG_JOB_FIELDS.items():
        with subtests.test(msg=name):
            status, body = await post_json(http, f"{network.client.url}/jobs", job)
            assert status == 422
            error = assert_error_body(body, "invalid_fields")
            assert isinstance(error["details"], list) and error["details"]
    await assert_no_jobs_anywhere(network)


async def test_deeply_nested_json_is_a_json_400(network: Network, http: aiohttp.ClientSession) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000  # well under 1 MiB
    answers: dict[str, tuple[int, str]] = {}
    for node, path in ((network.client, "/jobs"), (network.client, "/v1/chat/completions"), (network.driver, "/node/message")):
        async with http.post(f"{node.url}{path}", data=nested, headers={"Content-Type": "application/json"}) as response:
            answers[path] = (response.status, response.content_type)
            if response.content_type == "application/json":
                assert_error_body(await response.json(), "malformed_json")
    assert answers == {path: (400, "application/json") for path in answers}
    await assert_no_jobs_anywhere(network)


async def test_body_over_the_default_limit_is_413_and_stores_nothing(network: Network, http: aiohttp.ClientSession) -> None:
    huge = json.dumps({"model": MODEL, "prompt": "a" * (Settings().max_body_bytes + 10)}).encode()
    for path in ("/jobs", "/v1/chat/completions", "/v1/embeddings"):
        status, body = await post_raw(http, f"{network.client.url}{path}", huge)
        assert status == 413, path
        assert_error_body(body, "body_too_large")
    await assert_no_jobs_anywhere(network)


async def test_the_body_limit_is_configurable(start_node: StartNode, http: aiohttp.ClientSession) -> None:
    small = await start_node("small.dev", settings=Settings(max_body_bytes=ONE_MIB))
    await small.admin({"SetLocalDriver": {"model": MODEL}})
    status, body = await post_json(http, f"{small.url}/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a" * ONE_MIB}]})
    assert status == 413
    assert str(ONE_MIB) in assert_error_body(body, "body_too_large")["message"]
    assert await count_rows(small, Job) == 0
    await submit(http, small.url, {"model": MODEL, "prompt": "a" * (ONE_MIB - 200)})  # just under it: taken


async def test_a_body_of_several_mib_is_accepted(network: Network, http: aiohttp.ClientSession) -> None:
    filler = 3 * ONE_MIB  # an image sent inline, say
    _, updates = await run_job(http, network.driver.url, {"model": MODEL, "prompt": "a" * filler, "max_tokens": 1})
    assert updates[-1]["status"] == "succeeded"


async def test_unknown_model_is_404_listing_models_on_offer(network: Network, http: aiohttp.ClientSession) -> None:
    status, body = await post_json(http, f"{network.client.url}/jobs", {"model": "gpt-99", "prompt": "hi"})
    assert status == 404
    error = assert_error_body(body, "model_not_found")
    assert "gpt-99" in error["message"]
    assert MODEL in error["details"]["models"]
    await assert_no_jobs_anywhere(network)


async def test_unknown_model_on_a_driver_node_is_404_and_stores_nothing(network: Network, http: aiohttp.ClientSession) -> None:
    status, body = await post_json(http, f"{network.driver.url}/jobs", {"model": "gpt-99", "prompt": "hi"})
    assert status == 404
    assert MODEL in assert_error_body(body, "model_not_found")["details"]["models"]
    await assert_no_jobs_anywhere(network)


async def test_unknown_model_on_a_routerless_driver_lists_its_own_models(start_node: StartNode, http: aiohttp.ClientSession) -> None:
    solo = await start_node("solo.dev")
    await solo.admin({"SetLocalDriver": {"models": ["mistral", "qwen"]}})
    status, body = await post_json(http, f"{solo.url}/jobs", {"model": "gpt-99", "prompt": "hi"})
    assert status == 404
    assert assert_error_body(body, "model_not_found")["details"]["models"] == ["mistral", "qwen"]
    assert await count_rows(solo, Job) == 0
    assert await count_rows(solo, ServedJob) == 0


async def test_node_without_router_is_503_and_stores_nothing(start_node: StartNode, http: aiohttp.ClientSession) -> None:
    lone = await start_node("lone.dev")
    status, body = await post_json(http, f"{lone.url}/jobs", {"model": MODEL, "prompt": "hi"})
    assert status == 503
    error = assert_error_body(body, "no_router")
    assert error["type"] == "server_error"
    assert await count_rows(lone, Job) == 0


async def test_unreachable_router_is_503_and_the_job_row_is_removed(start_node: StartNode, http: aiohttp.ClientSession) -> None:
    lost = await start_node("lost.dev")
    await lost.admin({"SetRouter": {"node": "nowhere.dev"}})
    status, body = await post_json(http, f"{lost.url}/jobs", {"model": MODEL, "prompt": "hi"})
    assert status == 503
    assert_error_body(body, "router_unreachable")
    assert await count_rows(lost, Job) == 0


# --- unknown jobs and routes -----------------------------------------------------------------------


async def test_unknown_job_is_404(network: Network, http: aiohttp.ClientSession) -> None:
    for path in ("/jobs/x", "/jobs/x/events", "/jobs/0123456789abcdef0123456789abcdef"):
        async with http.get(f"{network.client.url}{path}") as response:
            assert response.status == 404, path
            assert response.content_type == "application/json"
            assert_error_body(await response.json(), "job_not_found")


async def test_bad_last_event_id_is_400(network: Network, http: aiohttp.ClientSession) -> None:
    created, _ = await run_job(http, network.client.url, {"model": MODEL, "prompt": "hi", "max_tokens": 1})
    async with http.get(f"{network.client.url}{created['events_url']}", headers={"Last-Event-ID": "seven"}) as response:
        assert response.status == 400
        assert_error_body(await response.json(), "bad_last_event_id")


async def test_unknown_route_and_wrong_method_answer_json_errors(network: Network, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{network.client.url}/nowhere") as response:
        assert response.status == 404
        assert_error_body(await response.json())
    async with http.get(f"{network.client.url}/jobs") as response:
        assert response.status == 405
        assert_error_body(await response.json())


# --- POST /v1/chat/completions ----------------------------------------------------------------------


async def test_chat_completions_malformed_json_is_400(network: Network, http: aiohttp.ClientSession) -> None:
    status, body = await post_raw(http, f"{network.client.url}/v1/chat/completions", b'{"model": ')
    assert status == 400
    assert_error_body(body, "malformed_json")
    await assert_no_jobs_anywhere(network)


WRONG_CHAT_FIELDS: dict[str, Any] = {
    "missing-messages": {"model": MODEL},
    "missing-model": {"messages": [{"role": "user", "content": "hi"}]},
    "messages-not-list": {"model": MODEL, "messages": "hi"},
    "message-without-role": {"model": MODEL, "messages": [{"content": "hi"}]},
    "stream-not-bool": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": [1]},
    "stream_options-not-object": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream_options": 1},
    "empty-messages": {"model": MODEL, "messages": []},
    "not-an-object": [1, 2],
}


async def test_chat_completions_wrong_fields_are_422(network: Network, http: aiohttp.ClientSession, subtests: Any) -> None:
    for name, request_body in WRONG_CHAT_FIELDS.items():
        with subtests.test(msg=name):
            status, body = await post_json(http, f"{network.client.url}/v1/chat/completions", request_body)
            assert status == 422
            assert_error_body(body, "invalid_fields")
    await assert_no_jobs_anywhere(network)


async def test_chat_completions_unknown_model_is_404(network: Network, http: aiohttp.ClientSession) -> None:
    request_body = {"model": "gpt-99", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    status, body = await post_json(http, f"{network.client.url}/v1/chat/completions", request_body)
    assert status == 404
    assert MODEL in assert_error_body(body, "model_not_found")["details"]["models"]
    await assert_no_jobs_anywhere(network)


WRONG_ENDPOINT_FIELDS: dict[str, tuple[str, Any]] = {
    "completion-without-prompt": ("/v1/completions", {"model": MODEL}),
    "completion-prompt-not-text": ("/v1/completions", {"model": MODEL, "prompt": 3}),
    "embedding-without-input": ("/v1/embeddings", {"model": MODEL}),
    "embedding-without-model": ("/v1/embeddings", {"input": "hi"}),
}


async def test_completions_and_embeddings_wrong_fields_are_422(network: Network, http: aiohttp.ClientSession, subtests: Any) -> None:
    for name, (path, request_body) in WRONG_ENDPOINT_FIELDS.items():
        with subtests.test(msg=name):
            status, body = await post_json(http, f"{network.client.url}{path}", request_body)
            assert status == 422
            assert_error_body(body, "invalid_fields")
    await assert_no_jobs_anywhere(network)


# --- admin -----------------------------------------------------------------------------------------


ADMIN_ATTEMPTS: list[tuple[str, Any]] = [
    ("/admin", {"SetRouter": {"node": "evil.dev"}}),
    ("/admin", "StartRouter"),
    ("/admin/openai", {"RegisterOaiProviderEndpoint": {"endpoint": "http://evil.invalid/v1"}}),
    ("/admin/driver", {"SetLocalDriver": {"model": "stolen"}}),
]


async def test_admin_without_the_right_token_is_401_and_changes_nothing(
    network: Network, http: aiohttp.ClientSession, subtests: Any
) -> None:
    before = await node_config(network.client)
    assert before["router_node"] == "fake.dev" and not before["is_router"]
    for authorization in (None, "Bearer wrong-token", "wrong-token", "Bearer ", "Basic abc"):
        headers = {} if authorization is None else {"Authorization": authorization}
        for path, message in ADMIN_ATTEMPTS:
            with subtests.test(msg=f"{authorization} {path} {message}"):
                status, body = await post_json(http, f"{network.client.url}{path}", message, headers)
                assert status == 401
                assert_error_body(body, "admin_token_required")
    assert await node_config(network.client) == before


async def test_admin_token_of_another_node_is_refused(network: Network, http: aiohttp.ClientSession) -> None:
    other = network.driver.node.home.admin_token()
    status, body = await post_json(
        http, f"{network.client.url}/admin", {"SetRouter": {"node": "evil.dev"}}, {"Authorization": f"Bearer {other}"}
    )
    assert status == 401
    assert_error_body(body, "admin_token_required")
    assert (await node_config(network.client))["router_node"] == "fake.dev"


async def test_admin_message_in_a_signed_node_envelope_is_403(network: Network, http: aiohttp.ClientSession, subtests: Any) -> None:
    before = await node_config(network.client)
    attempts = [
        ("router", "StartRouter"),
        ("driver", {"SetRouter": {"node": "evil.dev"}}),
        ("driver", {"SetLocalDriver": {"model": "stolen"}}),
        ("driver", {"SetJobTimeout": {"seconds": 1}}),
        ("openai", {"RegisterOaiProviderEndpoint": {"endpoint": "http://evil.invalid/v1"}}),
    ]
    # Properly signed by a peer, or even by the node itself: a node message is never an admin command.
    for signer in (network.router, network.client):
        for target, message in attempts:
            with subtests.test(msg=f"{signer.name} → {target}: {message}"):
                status, body = await post_envelope(http, network.client, envelope(signer.name, "driver", target, message), signer)
                assert status == 403
                assert_error_body(body, "admin_only")
    assert await node_config(network.client) == before


async def test_unsigned_or_forged_envelopes_are_401(network: Network, http: aiohttp.ClientSession, subtests: Any) -> None:
    message = {"SetRouter": {"node": "evil.dev"}}
    cases: dict[str, tuple[dict[str, Any], RunningNode | None, str]] = {
        "unsigned": (envelope("fake.dev", "router", "driver", message), None, "bad_signature"),
        "signed-by-another-peer": (envelope("fake.dev", "router", "driver", message), network.driver, "bad_signature"),
        "unknown-sender": (envelope("evil.dev", "router", "driver", message), network.driver, "unknown_node"),
    }
    for name, (raw, signer, code) in cases.items():
        with subtests.test(msg=name):
            status, body = await post_envelope(http, network.client, raw, signer)
            assert status == 401
            assert_error_body(body, code)
    assert (await node_config(network.client))["router_node"] == "fake.dev"


async def test_replayed_envelope_is_401(network: Network, http: aiohttp.ClientSession) -> None:
    raw = {"destination": "fake.dev", **envelope("fake3.dev", "driver", "router", "ListModels")}
    data = json.dumps(raw).encode()
    headers = {SIGNATURE_HEADER: sign(network.client, data)}
    status, body = await post_raw(http, f"{network.router.url}/node/message", data, headers)
    assert status == 200, body
    assert MODEL in [model["id"] for model in body["models"]]
    status, body = await post_raw(http, f"{network.router.url}/node/message", data, headers)
    assert status == 401
    assert_error_body(body, "replayed_message")


async def test_malformed_envelope_is_422(network: Network, http: aiohttp.ClientSession, subtests: Any) -> None:
    cases: dict[str, Any] = {
        "bad-target": {**envelope("fake.dev", "router", "driver", "ListModels"), "target": "gpu"},
        "no-process": {**envelope("fake.dev", "router", "driver", "ListModels"), "source": {"node": "fake.dev"}},
        "no-nonce": {key: value for key, value in envelope("fake.dev", "router", "driver", "ListModels").items() if key != "nonce"},
        "extra-field": {**envelope("fake.dev", "router", "driver", "ListModels"), "sig": "x"},
        "unknown-message": envelope("fake.dev", "router", "driver", {"Nonsense": {}}),
        "incomplete-runjob": envelope("fake.dev", "router", "driver", {"RunJob": {"job": {"job_id": "j"}}}),
    }
    for name, raw in cases.items():
        with subtests.test(msg=name):
            status, body = await post_envelope(http, network.driver, raw, network.router)
            assert status == 422
            assert_error_body(body, "invalid_fields")
    await assert_no_jobs_anywhere(network)


# --- spoofed senders (a job held running by a gated upstream) ------------------------------------------


@asynccontextmanager
async def held_job(http: aiohttp.ClientSession, net: Network) -> AsyncIterator[tuple[str, AsyncIterator[ServerSentEvent]]]:
    """Submit a job through the gated network and open its event stream: (job id, stream) once the first
    chunk ("alpha") arrived, the job held running until `finish`.  The whole block is bounded by GUARD_S."""
    created = await submit(http, net.client.url, {"model": MODEL, "prompt": "hi"})
    async with asyncio.timeout(GUARD_S), job_stream(http, net.client.url, created["job_id"]) as stream:
        assert (await next_update(stream))["delta"] == "alpha"  # the job is running, one chunk in
        yield created["job_id"], stream


async def finish(net: Network, stream: AsyncIterator[ServerSentEvent]) -> list[dict[str, Any]]:
    """Release the gated upstream: the held job's remaining updates, to the final one."""
    assert isinstance(net.upstream, HeldUpstream)
    net.upstream.gate.set()
    return await updates_to_final(stream)


async def chunks_of(node: RunningNode, job_id: str) -> list[tuple[int, str]]:
    async with store_of(node).reading() as session:
        rows = await session.scalars(select(JobChunk).where(JobChunk.job_id == job_id).order_by(JobChunk.seq))
        return [(row.seq, row.delta) for row in rows]


async def test_job_update_to_client_from_a_node_not_its_router_is_403(gated_network: Network, http: aiohttp.ClientSession) -> None:
    net = gated_network
    async with held_job(http, net) as (job_id, stream):
        # Its own driver, authenticated, is still not the job's router; nor can it pass for the router.
        for claimed, signer, status_code, code in (
            ("fake2.dev", net.driver, 403, "not_the_jobs_router"),
            ("fake.dev", net.driver, 401, "bad_signature"),
            ("fake.dev", None, 401, "bad_signature"),
        ):
            for update in (
                {"job_id": job_id, "seq": 1, "delta": "EVIL"},
                {"job_id": job_id, "seq": 1, "delta": "", "is_final": True, "status": "failed", "error": "spoofed"},
            ):
                raw = envelope(claimed, "router", "driver", {"JobUpdate": {"update": update}})
                status, body = await post_envelope(http, net.client, raw, signer)
                assert status == status_code
                assert_error_body(body, code)
        assert await chunks_of(net.client, job_id) == [(0, "alpha")]
        record = await get_json(http, f"{net.client.url}/jobs/{job_id}")
        assert record["status"] == "running"
        rest = await finish(net, stream)
    assert "".join(u["delta"] for u in rest) == " omega"
    assert rest[-1]["status"] == "succeeded"


async def test_job_update_to_router_from_a_node_not_the_jobs_driver_is_403(gated_network: Network, http: aiohttp.ClientSession) -> None:
    net = gated_network
    async with held_job(http, net) as (job_id, stream):
        update = {"job_id": job_id, "seq": 1, "delta": "EVIL", "is_final": True, "status": "failed"}
        for claimed, signer, status_code, code in (
            ("fake3.dev", net.client, 403, "not_the_jobs_driver"),
            ("fake2.dev", net.client, 401, "bad_signature"),
        ):
            raw = envelope(claimed, "driver", "router", {"JobUpdate": {"update": update}})
            status, body = await post_envelope(http, net.router, raw, signer)
            assert status == status_code
            assert_error_body(body, code)
        async with store_of(net.router).reading() as session:
            routed = await session.get(RoutedJob, job_id)
            assert routed is not None and routed.status == "running" and routed.driver_node == "fake2.dev"
        assert await chunks_of(net.client, job_id) == [(0, "alpha")]
        final = (await finish(net, stream))[-1]
    assert final["status"] == "succeeded"
    assert (await get_json(http, f"{net.client.url}/jobs/{job_id}"))["text"] == "alpha omega"



async def test_release_of_a_job_by_a_node_not_its_driver_is_403_and_the_job_runs_on(
    gated_network: Network, http: aiohttp.ClientSession
) -> None:
    net = gated_network
    async with held_job(http, net) as (job_id, stream):
        for job, claimed, signer, status_code, code in (
            (job_id, "fake3.dev", net.client, 403, "not_the_jobs_driver"),
            (job_id, "fake2.dev", net.client, 401, "bad_signature"),
            ("nope", "fake2.dev", net.driver, 404, "job_not_found"),
        ):
            raw = envelope(claimed, "driver", "router", {"ReleaseJob": {"job_id": job, "reason": "spoofed"}})
            status, body = await post_envelope(http, net.router, raw, signer)
            assert status == status_code, body
            assert_error_body(body, code)
        async with store_of(net.router).reading() as session:
            routed = await session.get(RoutedJob, job_id)
            assert routed is not None and (routed.status, routed.driver_node, routed.attempts) == ("running", "fake2.dev", 0)
        final = (await finish(net, stream))[-1]
    assert final["status"] == "succeeded"
    # Once the job has ended, its own driver cannot give it back either.
    raw = envelope("fake2.dev", "driver", "router", {"ReleaseJob": {"job_id": job_id, "reason": "late"}})
    status, body = await post_envelope(http, net.router, raw, net.driver)
    assert status == 409, body
    assert_error_body(body, "job_finished")
    assert (await get_json(http, f"{net.client.url}/jobs/{job_id}"))["text"] == "alpha omega"

async def test_job_update_for_an_unknown_job_is_404(network: Network, http: aiohttp.ClientSession) -> None:
    update = {"job_id": "nope", "seq": 0, "delta": "x"}
    for to, signer, target in ((network.client, network.router, "driver"), (network.router, network.driver, "router")):
        raw = envelope(signer.name, "router" if target == "driver" else "driver", target, {"JobUpdate": {"update": update}})
        status, body = await post_envelope(http, to, raw, signer)
        assert status == 404
        assert_error_body(body, "job_not_found")
    assert await count_rows(network.client, JobChunk) == 0


async def test_a_chunk_of_a_job_its_client_node_has_ended_is_409_so_its_driver_stops(network: Network, http: aiohttp.ClientSession) -> None:
    """A router process that has not seen the end (another replica ended it) relays a late chunk: the client's
    node refuses it, and a repeat of the final update is still taken as a repeat."""
    created, updates = await run_job(http, network.client.url, {"model": MODEL, "prompt": "hi"})
    final = updates[-1]
    assert final["is_final"] and final["status"] == "succeeded", final
    chunks_before = await count_rows(network.client, JobChunk)
    late = {"job_id": created["job_id"], "seq": final["seq"] + 1, "delta": "late"}
    status, body = await post_envelope(http, network.client, envelope(network.router.name, "router", "driver", {"JobUpdate": {"update": late}}), network.router)
    assert status == 409, body
    assert_error_body(body, "job_finished")
    repeat = {**final, "job_id": created["job_id"]}
    status, body = await post_envelope(http, network.client, envelope(network.router.name, "router", "driver", {"JobUpdate": {"update": repeat}}), network.router)
    assert status == 200, body
    assert await count_rows(network.client, JobChunk) == chunks_before


async def test_run_job_to_a_driver_from_a_node_not_its_router_is_403(network: Network, http: aiohttp.ClientSession) -> None:
    for claimed, signer, status_code, code in (
        ("fake3.dev", network.client, 403, "not_our_router"),
        ("fake.dev", network.client, 401, "bad_signature"),
    ):
        raw = envelope(claimed, "router", "driver", {"RunJob": {"job": job_spec(f"spoof-{claimed}", claimed)}})
        status, body = await post_envelope(http, network.driver, raw, signer)
        assert status == status_code
        assert_error_body(body, code)
    assert await count_rows(network.driver, ServedJob) == 0
    assert network.upstream.stats.requests == 0


async def test_run_job_to_router_for_another_client_is_403(network: Network, http: aiohttp.ClientSession) -> None:
    # fake2.dev, a peer the router knows, submits a job in fake3.dev's name.
    raw = envelope("fake2.dev", "driver", "router", {"RunJob": {"job": job_spec("spoof", "fake3.dev")}})
    status, body = await post_envelope(http, network.router, raw, network.driver)
    assert status == 403
    assert_error_body(body, "client_mismatch")
    await assert_no_jobs_anywhere(network)


async def test_router_messages_to_a_node_that_is_not_a_router_are_503(network: Network, http: aiohttp.ClientSession) -> None:
    raw = envelope("fake2.dev", "driver", "router", {"RunJob": {"job": job_spec("j", "fake2.dev")}})
    status, body = await post_envelope(http, network.client, raw, network.driver)
    assert status == 503
    assert_error_body(body, "not_a_router")
    assert await count_rows(network.client, RoutedJob) == 0


# --- upstream failure -----------------------------------------------------------------------------------


FAIL = [{"role": "user", "content": "FAIL"}]
FAILING_JOB_DEADLINE_S = 2.0
HELD_JOB_DEADLINE_S = 2.0


async def test_upstream_500_fails_a_local_job(network: Network, http: aiohttp.ClientSession) -> None:
    created, updates = await run_job(http, network.driver.url, {"model": MODEL, "messages": FAIL})
    final = updates[-1]
    assert final["is_final"] and final["status"] == "failed"
    assert "HTTP 500" in final["error"]
    record = await get_json(http, f"{network.driver.url}/jobs/{created['job_id']}")
    assert record["status"] == "failed" and "HTTP 500" in record["error"] and record["text"] == ""


async def test_upstream_500_fails_a_remote_job(network: Network, http: aiohttp.ClientSession) -> None:
    # The deadline only bounds the test; a failing upstream must end the job long before it.
    created, updates = await run_job(http, network.client.url, {"model": MODEL, "messages": FAIL, "timeout": FAILING_JOB_DEADLINE_S})
    final = updates[-1]
    assert final["is_final"] and final["status"] == "failed"
    assert "HTTP 500" in final["error"]
    # The router records the end right after it relays the final update: wait for that write.
    async with asyncio.timeout(GUARD_S):
        while True:
            async with store_of(network.router).reading() as session:
                routed = await session.get(RoutedJob, created["job_id"])
            assert routed is not None
            if routed.status != "running":
                break
            await asyncio.sleep(0.01)  # another component's commit: there is no event to await here
    assert routed.status == "failed"


async def test_upstream_500_makes_non_stream_chat_completion_502(network: Network, http: aiohttp.ClientSession) -> None:
    async with asyncio.timeout(GUARD_S):
        status, body = await post_json(http, f"{network.driver.url}/v1/chat/completions", {"model": MODEL, "messages": FAIL})
    assert status == 502
    error = assert_error_body(body, "job_failed")
    assert error["type"] == "server_error"
    assert "HTTP 500" in error["message"]


async def test_upstream_500_before_the_first_chunk_makes_a_streamed_chat_completion_502(network: Network, http: aiohttp.ClientSession) -> None:
    # A streamed answer holds its status until the first chunk: a failure before it is an HTTP error, as unstreamed.
    async with asyncio.timeout(GUARD_S):
        status, body = await post_json(http, f"{network.driver.url}/v1/chat/completions", {"model": MODEL, "messages": FAIL, "stream": True})
    assert status == 502
    assert "HTTP 500" in assert_error_body(body, "job_failed")["message"]


async def test_job_past_its_deadline_ends_timed_out(gated_network: Network, http: aiohttp.ClientSession) -> None:
    # The deadline must leave room for the first chunk to cross three nodes on a loaded machine:
    # 0.3 s was once too short in CI.  The upstream then holds the job until the deadline ends it.
    created = await submit(http, gated_network.client.url, {"model": MODEL, "prompt": "hi", "timeout": HELD_JOB_DEADLINE_S})
    async with asyncio.timeout(GUARD_S):
        updates = await job_updates(http, gated_network.client.url, created["job_id"])
    assert [u["delta"] for u in updates[:-1]] == ["alpha"]
    assert updates[-1]["status"] == "timed_out"
    record = await get_json(http, f"{gated_network.client.url}/jobs/{created['job_id']}")
    assert record["status"] == "timed_out" and record["text"] == "alpha"
