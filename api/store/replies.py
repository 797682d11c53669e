"""Reply logs: the text of a turn in flight, in a Redis stream that readers on any worker follow.

A turn writes its log only once a reader asks for it, so a turn nobody resumes costs Redis nothing
more than two keys its commit script looks at. A reader asks in two ways at once:

    attach_reader.lua   sets the session's readers flag to the turn's token (with an expiry the
                        reader renews while it waits), so the turn's commit ends the log itself,
                        in its atomic step, even if the producer never heard the reader
    PUBLISH             on one channel per deployment, which every worker listens to: the worker
                        producing that turn starts writing its log (the text so far, then the rest
                        coalesced), within a round trip

Entries, in the turn's own stream `SessionKeys.reply_log(token)`, with ids fixed by the producer so
that an append sent again is applied once:

    0-1          start   the protocol the turn was started with
    <bytes>-0    t       text; the id is the reply's length in bytes once this entry is added
    <bytes>-2    end     committed | failed

A log lives while its turn runs (each append renews its expiry) and `ENDED_TTL_MS` after its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from api.store.keys import SessionKeys
from api.store.redis import Client
from api.store.scripts import ScriptCall, Scripts

log = logging.getLogger("api.store.replies")

ENDED_TTL_MS = 30_000  # how long a reader that fell behind can still read an ended log
LIVE_TTL_MS = 300_000  # a log whose producer died is gone this long after its last append

START = b"start"
TEXT = b"t"
END = b"end"
COMMITTED = b"committed"
FAILED = b"failed"

Entry = tuple[bytes, dict[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class CommitTail:
    """What a commit adds for the turn's readers and its idempotency key (commit_turn.lua's keys 4-6,
    arguments 7-12)."""

    readers: str
    log: str
    logged: bool = False  # the turn writes its log: `text` is what it has not written yet
    text: bytes = b""
    size: int = 0  # the reply's length in bytes
    idempotency: str | None = None  # the record's key
    fingerprint: str = ""
    idempotency_ttl_ms: int = 0

    def keys(self) -> list[str]:
        keys = [self.readers, self.log]
        if self.idempotency is not None:
            keys.append(self.idempotency)
        return keys

    def args(self) -> list[str | bytes | int]:
        return [
            "1" if self.logged else "0",
            self.text,
            self.size,
            ENDED_TTL_MS,
            self.fingerprint,
            self.idempotency_ttl_ms,
        ]


class ReplyLogs:
    def __init__(
        self,
        redis: Client,
        scripts: Scripts,
        prefix: str,
        flag_ttl_ms: int,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.channel = f"{prefix}:replies-wanted"
        self.flag_ttl_ms = flag_ttl_ms
        self.on_error = on_error

    # Readers.

    async def attach(self, keys: SessionKeys, token: str = "") -> str | None:
        """The token of the turn in flight (`token` only if that one still is), having noted that a
        reader waits for it; None when none is."""
        found = await ScriptCall(
            self.scripts.attach_reader, [keys.lock, keys.readers()], [self.flag_ttl_ms, token]
        ).run()
        return found.decode() if isinstance(found, bytes) else None

    async def ask(self, token: str) -> None:
        """Tell whichever worker produces the turn to write its log."""
        await self.redis.publish(self.channel, token)

    async def read(self, log_key: str, after: bytes, block_ms: int | None) -> list[Entry]:
        """Entries after `after`, waiting up to `block_ms` for one (None: not at all)."""
        found: Any = await self.redis.xread({log_key: after}, count=256, block=block_ms)
        if not found:
            return []
        # RESP2 answers a list of [key, entries]; RESP3 a map of key -> entries.
        streams = found.values() if isinstance(found, dict) else [entries for _, entries in found]
        return [(entry_id, fields) for entries in streams for entry_id, fields in entries]

    # The producer.

    def append_call(self, log_key: str, entry_id: str, field: bytes, value: bytes) -> ScriptCall:
        return ScriptCall(self.scripts.append_reply, [log_key], [entry_id, field, value, LIVE_TTL_MS])

    def end_call(self, log_key: str, size: int, outcome: bytes) -> ScriptCall:
        return ScriptCall(self.scripts.append_reply, [log_key], [f"{size}-2", END, outcome, ENDED_TTL_MS])

    async def listen(self, on_token: Callable[[str], None], ready: asyncio.Event | None = None) -> None:
        """Call `on_token` for every turn a reader asks for, until cancelled. A message lost while
        the subscription reconnects costs a reader a second: it asks again until its log starts."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if ready is not None:
                    ready.set()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        data = message["data"]
                        on_token(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception:
                # Not counted as a Redis error: the metric counts what requests met, and a reader
                # meets this one only as a second's delay.
                log.warning("lost the subscription for resumed replies; subscribing again", exc_info=True)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())
