"""Idempotency keys of chat turns: claimed with the session's lock, answered from the committed reply.

A record per key, in the session's hash slot: `{fp, state: live|done, turn, reply}`. It is claimed
in the same step as the lock (claim_turn.lua), filled with the reply in the commit's step
(commit_turn.lua), and given back when its turn fails (release_claim.lua). A record whose turn
neither committed nor gave it back (its worker died) is known by the lock no longer holding its
token, and is claimed anew.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson

from api.store.history import SessionStore, Snapshot, redis_errors
from api.store.keys import SessionKeys
from api.store.locks import SessionLock
from api.store.scripts import ScriptCall, give_back


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The key was used with another body."""


@dataclass(frozen=True, slots=True)
class Committed:
    reply: bytes


@dataclass(frozen=True, slots=True)
class InFlight:
    token: str


Claim = Snapshot | Mismatch | Committed | InFlight | None  # None: another turn holds the lock


def record_key(keys: SessionKeys, idempotency_key: str) -> str:
    # Hashed: a key may be 255 characters of anything printable, braces included.
    return keys.idempotency(hashlib.sha256(idempotency_key.encode()).hexdigest()[:32])


class Idempotency:
    def __init__(self, store: SessionStore, ttl_seconds: int) -> None:
        self.store = store
        self.ttl_ms = ttl_seconds * 1000

    async def begin(self, keys: SessionKeys, record: str, token: str, fingerprint: str) -> Claim:
        """`SessionStore.begin`, for a turn sent with an idempotency key."""
        store = self.store
        args: list[str | int] = [token, store.lock_ttl_ms, fingerprint, self.ttl_ms]
        call = ScriptCall(store.scripts.claim_turn, [*keys.all(), record], args)
        try:
            async with redis_errors(store.on_error):
                reply = await call.run()
            kind = reply[0]
            if kind == 0:
                return None
            if kind == 2:
                return Mismatch()
            if kind == 3:
                return Committed(bytes(reply[1]))
            if kind == 4:
                return InFlight(reply[1].decode())
            messages = [orjson.loads(raw) for raw in reply[3]]
        except BaseException:
            await give_back(ScriptCall(store.scripts.release_lock, [keys.lock], [token]))
            await give_back(self.release_call(record, token))
            raise
        lock = SessionLock(store.redis, store.scripts, keys.lock, token, store.lock_ttl_ms)
        return Snapshot(lock, int(reply[1]), int(reply[2]), messages)

    def release_call(self, record: str, token: str) -> ScriptCall:
        return ScriptCall(self.store.scripts.release_claim, [record], [token])
