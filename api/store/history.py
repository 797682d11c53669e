"""Conversation history in Redis: begin a turn (lock + read), commit it (fenced, atomic, once), read, delete.

Each message is stored as one JSON string in a list, in the form the API returns it, so reading a
session's history splices stored bytes into the response without decoding them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.errors import StoreUnavailable
from api.store.keys import SessionKeys
from api.store.locks import SessionLock
from api.store.multiplex import SharedConnection
from api.store.redis import Client
from api.store.replies import CommitTail
from api.store.scripts import Bundle, Confirm, ScriptCall, Scripts, give_back, run_together

COMMIT_RETRY_DELAYS = (0.05, 0.25)  # then one last try


@dataclass(slots=True)
class Snapshot:
    """What a turn saw when it began: the history, its version, and the time on Redis's clock."""

    lock: SessionLock
    version: int
    now_ms: int
    messages: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Page:
    """A page of a session's history, oldest first, and the id to read the page before it with."""

    messages: list[bytes]
    next_before: str | None


class CommitRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CommitUnconfirmed(Exception):
    """The turn was written on the primary, but not enough replicas confirmed it in time: a failover
    now could lose it. `results` are those of the calls sent with it, as a commit returns them."""

    def __init__(self, replicas: int, results: list[Any]) -> None:
        super().__init__(f"the commit was not confirmed by {replicas} replicas in time")
        self.results = results


@asynccontextmanager
async def redis_errors(on_error: Callable[[], None] | None = None) -> AsyncIterator[None]:
    try:
        yield
    except RedisError as exc:
        if on_error is not None:
            on_error()
        raise StoreUnavailable("the session store is unavailable; try again shortly", retry_after=1) from exc


def iso_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def stored_message(message_id: str, role: str, content: str, created_ms: int, tokens: int) -> bytes:
    return orjson.dumps(
        {
            "id": message_id,
            "role": role,
            "content": content,
            "created_at": iso_time(created_ms),
            "tokens": tokens,
        }
    )


class SessionStore:
    def __init__(
        self,
        redis: Client,
        scripts: Scripts,
        *,
        ttl_seconds: int,
        max_messages: int,
        lock_ttl: float,
        on_error: Callable[[], None] | None = None,
        wait_replicas: int = 0,
        wait_timeout: float = 5.0,
        shared: SharedConnection | None = None,
    ) -> None:
        self.redis = redis
        # Calls sent together go as one script, where one script may touch them all.
        self.bundle = None if isinstance(redis, RedisCluster) else Bundle(redis, scripts, shared)
        # Each commit waits for this many replicas to hold it, so that a failover cannot lose it.
        self.confirm = Confirm(wait_replicas, max(1, int(wait_timeout * 1000))) if wait_replicas else None
        self.on_error = on_error  # told of every Redis failure, e.g. to count it
        self.scripts = scripts
        self.ttl_ms = ttl_seconds * 1000
        self.max_messages = max_messages
        self.lock_ttl_ms = max(1, int(lock_ttl * 1000))

    async def begin(self, keys: SessionKeys, token: str) -> Snapshot | None:
        """Lock the session and read its history in one round trip; None when another turn holds it.

        A reply that never came back, or could not be read (begin_turn.lua takes the lock before it
        reads the history), may leave the lock taken: it is given back by its token at once, rather
        than keep the session busy for a lock ttl.
        """
        try:
            async with redis_errors(self.on_error):
                reply = await self.begin_call(keys, token).run()
            return self.snapshot(keys, token, reply)
        except BaseException:
            await give_back(self.release_call(keys, token))
            raise

    def begin_call(self, keys: SessionKeys, token: str) -> ScriptCall:
        """The call that locks the session and reads its history; its reply goes to `snapshot`."""
        return ScriptCall(self.scripts.begin_turn, keys.all(), [token, self.lock_ttl_ms])

    def release_call(self, keys: SessionKeys, token: str) -> ScriptCall:
        return ScriptCall(self.scripts.release_lock, [keys.lock], [token])

    def snapshot(self, keys: SessionKeys, token: str, reply: list[Any]) -> Snapshot | None:
        if reply[0] == 0:
            return None
        messages = [orjson.loads(raw) for raw in reply[3]]
        lock = SessionLock(self.redis, self.scripts, keys.lock, token, self.lock_ttl_ms)
        return Snapshot(lock, int(reply[1]), int(reply[2]), messages)

    async def commit(
        self,
        keys: SessionKeys,
        snapshot: Snapshot,
        turn_id: str,
        messages: list[bytes],
        *,
        replace_last: bool,
        tail: CommitTail | None = None,
        also: Sequence[ScriptCall] = (),
    ) -> list[Any]:
        """Append the turn and release the lock, or raise `CommitRefused` and write nothing.

        `tail` says what the same step does for the turn's readers and its idempotency key (by
        default: a turn that writes no reply log and has no key). `also` runs in the same round trip,
        whatever the commit's fate; their results (a script's error in its place) are returned when
        the commit succeeds. With replicas to wait for, a commit they did not confirm in time raises
        `CommitUnconfirmed`.
        """
        if tail is None:
            tail = CommitTail(keys.readers(), keys.reply_log(snapshot.lock.token))
        args: list[str | bytes | int] = [
            snapshot.lock.token,
            snapshot.version,
            turn_id,
            self.ttl_ms,
            self.max_messages,
            "1" if replace_last else "0",
            *tail.args(),
            *messages,
        ]
        commit = ScriptCall(self.scripts.commit_turn, [*keys.all(), *tail.keys()], args)
        async with redis_errors(self.on_error):
            results = await self._send_commit([commit, *also])
            if isinstance(results[0], RedisError):
                raise results[0]
        if results[0] == 1:
            snapshot.lock.held = False
            if self.confirm is None:
                return results[1:]
            acks = results.pop()
            if isinstance(acks, Exception) or int(acks) < self.confirm.replicas:
                raise CommitUnconfirmed(self.confirm.replicas, results[1:])
            return results[1:]
        raise CommitRefused(
            "the session's lock was lost" if results[0] == 0 else "the history changed meanwhile"
        )

    async def _send_commit(self, calls: list[ScriptCall]) -> list[Any]:
        """A commit whose reply was lost may have been applied: send it again, since the script
        recognises its turn id and the settle its lease, rather than tell the client its whole
        reply failed (its retry would then store the turn twice)."""
        for delay in COMMIT_RETRY_DELAYS:
            try:
                return await run_together(self.redis, calls, self.confirm, self.bundle)
            except (RedisConnectionError, RedisTimeoutError):
                if self.on_error is not None:
                    self.on_error()
                await asyncio.sleep(delay)
        return await run_together(self.redis, calls, self.confirm, self.bundle)

    async def create(self, keys: SessionKeys) -> bool:
        async with redis_errors(self.on_error):
            created = await self.scripts.create_session(keys=[keys.meta], args=[self.ttl_ms])
        return bool(created)

    async def read_page(self, keys: SessionKeys, limit: int, before: str | None) -> Page | None:
        """Up to `limit` stored messages as raw JSON, oldest first, just before the message `before`
        (or the newest); None when the session does not exist.

        Raises `KeyError` when no stored message has the id `before` (it may have been trimmed).
        """
        async with redis_errors(self.on_error):
            reply = await self.scripts.read_page(keys=[keys.history, keys.meta], args=[limit, before or ""])
        if reply[0] == 0:
            return None
        if reply[1] == 0:
            raise KeyError(before)
        messages: list[bytes] = list(reply[3])
        if int(reply[2]) == 0 or not messages:
            return Page(messages, None)
        return Page(messages, orjson.loads(messages[0])["id"])

    async def delete(self, keys: SessionKeys) -> bool:
        """Forget the session. Deleting the lock too makes an in-flight turn's commit fail its token check."""
        async with redis_errors(self.on_error), self.redis.pipeline(transaction=True) as pipe:
            pipe.exists(keys.history, keys.meta)
            pipe.delete(*keys.all())
            existed, _ = await pipe.execute()
        return bool(existed)
