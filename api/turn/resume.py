"""A reply that outlives its connection: the producer's side (`ReplyTap`) and a reader's (`Follower`).

A turn writes nothing for readers until one asks (see `api.store.replies`). Then its `ReplyTap`
writes the text so far and the rest coalesced: at most one append in flight, the next one
`FLUSH_SECONDS` after the text grew, or at once when `FLUSH_BYTES` are waiting, never one per delta.
A `Follower` reads the log from the start, skips to its offset, and ends as the turn does: the
commit's end entry, a failure's, or none at all when the producer died (its lock is gone).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

from api.errors import StreamFailed
from api.outcomes import Outcome
from api.store.keys import SessionKeys
from api.store.replies import COMMITTED, END, START, TEXT, ReplyLogs
from api.store.scripts import ScriptCall

log = logging.getLogger("api.turn.resume")

FLUSH_SECONDS = 0.05
FLUSH_BYTES = 4096
PROTOCOLS = ("text", "sse")


def new_token(protocol: str) -> str:
    """A turn's lock token, which is also how readers learn the protocol the turn was started with."""
    return f"{secrets.token_hex(16)}.{protocol}"


def protocol_of(token: str) -> str:
    protocol = token.rpartition(".")[2]
    return protocol if protocol in PROTOCOLS else "text"


class ReplyTap:
    """Writes a turn's reply to its log, from the moment a reader asked for it to the turn's end."""

    __slots__ = ("_again", "_logs", "_parts", "_task", "_timer", "closed", "flushed", "key")

    def __init__(self, logs: ReplyLogs, key: str, protocol: str) -> None:
        self._logs = logs
        self.key = key
        self._parts: bytearray | None = None  # the reply so far, once the turn has its first text
        self.flushed = 0  # bytes of it in the log
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self._write(logs.append_call(key, "0-1", START, protocol.encode()))
        )
        self._again = False

    def feed(self, parts: bytearray) -> None:
        """The turn's reply buffer, which grows as the reply arrives; `grew()` is called after each growth."""
        self._parts = parts
        self.grew()

    def grew(self) -> None:
        if self.closed or self._parts is None:
            return
        if self._task is not None:
            self._again = True  # looked at again once the append in flight is done
            return
        if len(self._parts) - self.flushed >= FLUSH_BYTES:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        call = self._pending_call()
        if call is not None and self._task is None and not self.closed:
            self._task = asyncio.get_running_loop().create_task(self._write(call))

    def _pending_call(self) -> ScriptCall | None:
        parts = self._parts
        if parts is None or len(parts) <= self.flushed:
            return None
        end = len(parts)
        call = self._logs.append_call(self.key, f"{end}-0", TEXT, bytes(parts[self.flushed : end]))
        self.flushed = end  # a failed append is not retried: its readers end incomplete, by the lock
        return call

    async def _write(self, call: ScriptCall) -> None:
        try:
            await call.run()
        except Exception:
            log.warning("could not append to a reply log", exc_info=True)
        finally:
            self._task = None
        if self._again:
            self._again = False
            self.grew()

    async def finish(self) -> tuple[bytes, int]:
        """Stop writing: what is not in the log yet, and the reply's whole size, for the commit to add."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None:
            await asyncio.shield(task)
        parts = self._parts or bytearray()
        return bytes(parts[self.flushed :]), len(parts)

    async def end_calls(self, outcome: bytes) -> list[ScriptCall]:
        """The appends that end the log of a turn that failed: its last text, then the end."""
        tail, size = await self.finish()
        calls = [] if not tail else [self._logs.append_call(self.key, f"{size}-0", TEXT, tail)]
        calls.append(self._logs.end_call(self.key, size, outcome))
        return calls


class Follower:
    """One reader of a turn in flight: `chunks()` yields the reply from `offset` characters on, live,
    and returns when the turn committed; it raises `StreamFailed` when the turn ended otherwise."""

    def __init__(self, logs: ReplyLogs, keys: SessionKeys, token: str, offset: int, block_ms: int) -> None:
        self.logs = logs
        self.keys = keys
        self.token = token
        self.offset = offset
        self.block_ms = block_ms

    @property
    def protocol(self) -> str:
        return protocol_of(self.token)

    async def chunks(self) -> AsyncIterator[bytes]:
        logs, key, skip = self.logs, self.keys.reply_log(self.token), self.offset
        after = b"0-0"
        started = False
        final = False  # the turn is no longer in flight: read what is left, then stop
        while True:
            entries = await logs.read(key, after, None if final else self.block_ms)
            for entry_id, fields in entries:
                after = entry_id
                text = fields.get(TEXT)
                if text is not None:
                    if skip:
                        decoded = text.decode()
                        if len(decoded) <= skip:
                            skip -= len(decoded)
                            continue
                        text, skip = decoded[skip:].encode(), 0
                    yield text
                elif END in fields:
                    if fields[END] == COMMITTED:
                        return
                    raise StreamFailed("the reply failed", Outcome.UPSTREAM_ERROR)
                elif START in fields:
                    started = True
            if entries:
                continue
            if final:
                raise StreamFailed("the turn ended without finishing its reply", Outcome.UNKNOWN_ERROR)
            # A quiet spell: is the turn still in flight, and did its producer hear us?
            if await logs.attach(self.keys, self.token) is None:
                final = True
            elif not started:
                await logs.ask(self.token)


class Duplicate:
    """A repeat of a turn sent with the same idempotency key: its committed reply, or its live one."""

    def __init__(
        self, replayed: bytes | None, follower: Follower | None, close: Callable[[], Any] | None = None
    ) -> None:
        self.replayed = replayed
        self.follower = follower
        self._close = close

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.replayed is not None:
            yield self.replayed
            return
        assert self.follower is not None
        async for chunk in self.follower.chunks():
            yield chunk

    async def close(self) -> None:
        if self._close is not None:
            close, self._close = self._close, None
            await close()
