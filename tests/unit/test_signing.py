"""Node identity without a node: Ed25519 signatures over a message's exact bytes, and the replay guard's window."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from handlers.errors import ErrorCode, HandlerError
from llm_provider.signing import NodeKey, ReplayGuard, authenticate, signature_is_valid


def test_a_signature_holds_for_the_exact_bytes_and_the_signers_key_only(tmp_path: Path) -> None:
    key, other = NodeKey.load_or_create(tmp_path / "a.key"), NodeKey.load_or_create(tmp_path / "b.key")
    data = b'{"body": "RunJob"}'
    signature = key.sign(data)
    assert signature_is_valid(key.public_key, data, signature)
    assert not signature_is_valid(key.public_key, data + b" ", signature)
    assert not signature_is_valid(other.public_key, data, signature)
    assert not signature_is_valid(key.public_key, data, "not base64 at all!")
    assert not signature_is_valid("not a key", data, signature)


def test_a_key_is_made_once_and_read_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = NodeKey.load_or_create(path)
    assert NodeKey.load_or_create(path).public_key == first.public_key
    assert path.stat().st_mode & 0o077 == 0  # readable by its owner only


async def test_authenticate_refuses_an_unknown_sender_a_bad_signature_and_a_replay(tmp_path: Path) -> None:
    key = NodeKey.load_or_create(tmp_path / "node.key")
    guard = ReplayGuard()
    data, now, nonce = b"message", time.time(), secrets.token_hex(16)

    async def refusal(public_key: str | None, signature: str | None) -> ErrorCode:
        with pytest.raises(HandlerError) as refused:
            await authenticate(public_key, "fake2.dev", data, signature, guard, now, nonce)
        assert refused.value.status == 401
        return refused.value.code

    assert await refusal(None, key.sign(data)) == ErrorCode.UNKNOWN_NODE
    assert await refusal(key.public_key, None) == ErrorCode.BAD_SIGNATURE
    assert await refusal(key.public_key, key.sign(b"other bytes")) == ErrorCode.BAD_SIGNATURE
    await authenticate(key.public_key, "fake2.dev", data, key.sign(data), guard, now, nonce)
    assert await refusal(key.public_key, key.sign(data)) == ErrorCode.REPLAYED_MESSAGE


async def test_a_message_sent_before_the_process_booted_is_refused() -> None:
    guard = ReplayGuard()
    assert await guard.check(guard.booted_at - 5, secrets.token_hex(16)) == "the message is too old, or from the future"
    assert await guard.check(guard.booted_at, secrets.token_hex(16)) is None


async def test_replay_guard_window_is_sixty_seconds_either_way() -> None:
    guard = ReplayGuard()
    guard.booted_at -= 3600  # a process up for an hour: only the window decides
    now = time.time()
    assert await guard.check(now - 65, secrets.token_hex(16)) is not None
    assert await guard.check(now + 65, secrets.token_hex(16)) is not None
    nonce = secrets.token_hex(16)
    assert await guard.check(now - 50, nonce) is None
    assert await guard.check(now - 50, nonce) == "the message was replayed"
