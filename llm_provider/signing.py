"""Node identity: every node-to-node message is signed with the sender's Ed25519 key.

The signature covers the exact bytes of the envelope, which carries when it was sent and a
nonce; a receiver checks it against the public key the directory holds for the claimed sender,
refuses messages older than the replay window or sent before it booted, and refuses a nonce it
has seen within the window.
"""

from __future__ import annotations

import base64
import time
from collections import deque
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy.ext.asyncio import AsyncSession

from handlers.errors import ErrorCode, HandlerError
from llm_provider.homes import create_once
from store.database import Store, insert_or_ignore
from store.models import SeenNonce

SIGNATURE_HEADER = "X-Node-Signature"
REPLAY_WINDOW_S = 60.0


class NodeKey:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key = base64.b64encode(raw).decode()

    @classmethod
    def load_or_create(cls, path: Path) -> NodeKey:
        """The node's key pair, made on first boot and readable only by its owner."""
        if not path.exists():
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            create_once(path, pem)
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 key")
        return cls(private)

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self._private.sign(data)).decode()


def signature_is_valid(public_key: str, data: bytes, signature: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key)).verify(base64.b64decode(signature), data)
    except (InvalidSignature, ValueError):
        return False
    return True


class ReplayGuard:
    """Nonces seen within the window.  Messages sent before this process booted are refused, so a
    restart, which forgets the nonces, does not reopen the window.  When other processes of the node
    share its store (and any of them may receive a message), the nonces are kept there as well."""

    def __init__(self, store: Store | None = None, window: float = REPLAY_WINDOW_S) -> None:
        self.window = window
        self.booted_at = time.time()
        self._store = store if store is not None and store.shared else None
        self._seen: set[str] = set()
        # (when a nonce may be forgotten, nonce) in arrival order, so the oldest leave from the front
        self._forget: deque[tuple[float, str]] = deque()

    async def check(self, sent_at: float, nonce: str) -> str | None:
        now = time.time()
        if sent_at < self.booted_at - 1.0 or abs(now - sent_at) > self.window:
            return "the message is too old, or from the future"
        while self._forget and self._forget[0][0] <= now:
            self._seen.discard(self._forget.popleft()[1])
        if nonce in self._seen:
            return "the message was replayed"
        self._seen.add(nonce)
        # A message sent up to `window` in the future stays acceptable for `window` after that.
        self._forget.append((now + 2 * self.window, nonce))
        if self._store is not None and not await self._first_sight_in_store(self._store, sent_at, nonce):
            return "the message was replayed (to another process of this node)"
        return None

    @staticmethod
    async def _first_sight_in_store(store: Store, sent_at: float, nonce: str) -> bool:
        async def remember(session: AsyncSession) -> bool:
            insert = insert_or_ignore(session, SeenNonce).values(nonce=nonce, sent_at=sent_at)
            return bool((await session.execute(insert)).rowcount)  # type: ignore[attr-defined]

        return bool(await store.write_soon(remember))


async def authenticate(public_key: str | None, sender: str, data: bytes, signature: str | None, guard: ReplayGuard,
                 sent_at: float, nonce: str) -> None:
    """Raise 401 unless `data` was signed by `sender`, recently, and not seen before."""
    if public_key is None:
        raise HandlerError(401, ErrorCode.UNKNOWN_NODE, f"no public key for node {sender!r} in the directory")
    if signature is None or not signature_is_valid(public_key, data, signature):
        raise HandlerError(401, ErrorCode.BAD_SIGNATURE, f"the message is not signed by {sender}")
    if (problem := await guard.check(sent_at, nonce)) is not None:
        raise HandlerError(401, ErrorCode.REPLAYED_MESSAGE, problem)
