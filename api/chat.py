"""One chat turn, end to end: validate -> lock and read history -> open the reply -> relay -> commit.

Until `open_turn` returns, every failure is a `ChatError` and leaves Redis as it was. After that, the
caller relays `Turn.chunks()` and then calls `Turn.commit()`; whatever happens, it calls `Turn.close()`,
which gives back the lock and the upstream connection unless the commit already did.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from api.config import Settings
from api.errors import (
    ChatError,
    InvalidRequest,
    NotFound,
    RequestTooLarge,
    SessionBusy,
    StreamFailed,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from api.history import CommitRefused, SessionStore, Snapshot, stored_message
from api.keys import SessionKeys, session_keys
from api.outcomes import Outcome, OutcomeRecorder, TurnReport
from api.schemas import ChatRequest
from api.upstream import Reply, ReplyBroken, Upstream, UpstreamRequest

log = logging.getLogger("api.chat")

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def estimate_tokens(text: str) -> int:
    # A deliberate over-estimate (about 4 bytes of UTF-8 per token) so trimmed context fits.
    return (len(text.encode()) + 3) // 4


def build_context(history: list[dict[str, Any]], user_text: str, budget: int) -> list[dict[str, str]]:
    """The newest messages that fit `budget` tokens with the new message, never opening on the assistant."""
    used = estimate_tokens(user_text)
    start = len(history)
    while start > 0:
        message = history[start - 1]
        cost = message.get("tokens") or estimate_tokens(message["content"])
        if used + cost > budget:
            break
        used += cost
        start -= 1
    while start < len(history) and history[start]["role"] != "user":
        start += 1
    context = [{"role": m["role"], "content": m["content"]} for m in history[start:]]
    context.append({"role": "user", "content": user_text})
    return context


@dataclass(slots=True)
class TurnRequest:
    tenant: str
    session_id: str | None
    body: ChatRequest


class Turn:
    """A turn whose reply has begun: the first chunk is in hand and the session (if any) is locked."""

    __slots__ = (
        "_chunks",
        "_parts",
        "_service",
        "_started",
        "first",
        "keys",
        "regenerate",
        "reply",
        "report",
        "snapshot",
        "user_text",
    )

    def __init__(
        self,
        service: ChatService,
        report: TurnReport,
        reply: Reply,
        chunks: AsyncIterator[bytes],
        first: bytes,
        keys: SessionKeys | None,
        snapshot: Snapshot | None,
        user_text: str,
        regenerate: bool,
        started: float,
    ) -> None:
        self._service = service
        self.report = report
        self.reply = reply
        self._chunks = chunks
        self.first = first
        self.keys = keys
        self.snapshot = snapshot
        self.user_text = user_text
        self.regenerate = regenerate
        self._started = started
        # Only a session turn needs the text back for its commit.
        self._parts: list[bytes] | None = [first] if keys is not None else None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The rest of the reply. Raises `StreamFailed` if it cannot be completed."""
        lock = self.snapshot.lock if self.snapshot is not None else None
        parts = self._parts
        loop = asyncio.get_running_loop()
        renew_every = self._service.lock_renew_seconds
        renew_at = loop.time() + renew_every
        try:
            async for chunk in self._chunks:
                if parts is not None:
                    parts.append(chunk)
                yield chunk
                if lock is not None and loop.time() >= renew_at:
                    # Renewing between chunks costs nothing on the hot path; a stall long enough
                    # to miss a renewal is cut by the upstream read timeout anyway.
                    if not await lock.renew():
                        raise StreamFailed("the session lock was lost", Outcome.UNKNOWN_ERROR)
                    renew_at = loop.time() + renew_every
        except ReplyBroken as exc:
            self.report.upstream_error = exc.kind
            raise StreamFailed(exc.reason) from exc

    async def commit(self) -> None:
        """Store the user message and the reply together, or raise `StreamFailed` having stored nothing."""
        if self.keys is None or self.snapshot is None or self._parts is None:
            return
        store = self._service.store
        assert store is not None
        snapshot = self.snapshot
        reply_ms = snapshot.now_ms + int((time.monotonic() - self._started) * 1000)
        reply_text = b"".join(self._parts).decode()
        messages: list[bytes] = []
        if not self.regenerate:
            messages.append(
                stored_message(
                    _message_id(), "user", self.user_text, snapshot.now_ms, estimate_tokens(self.user_text)
                )
            )
        output_tokens = self.reply.decoder.output_tokens or estimate_tokens(reply_text)
        messages.append(stored_message(_message_id(), "assistant", reply_text, reply_ms, output_tokens))
        try:
            await store.commit(
                self.keys, snapshot, snapshot.lock.token, messages, replace_last=self.regenerate
            )
        except CommitRefused as exc:
            raise StreamFailed(exc.reason, Outcome.UNKNOWN_ERROR) from exc
        except ChatError as exc:
            raise StreamFailed(exc.message, Outcome.UNKNOWN_ERROR) from exc
        self.report.committed = True

    async def close(self) -> None:
        """Give back what the turn holds. Safe to call on every path, once."""
        decoder = self.reply.decoder
        self.report.input_tokens = decoder.input_tokens
        self.report.output_tokens = decoder.output_tokens
        await self._service.release(self.reply, self.snapshot)


class ChatService:
    def __init__(
        self,
        settings: Settings,
        store: SessionStore,
        upstream: Upstream,
        recorder: OutcomeRecorder,
    ) -> None:
        self.settings = settings
        self.store = store
        self.upstream = upstream
        self.recorder = recorder
        self.lock_renew_seconds = settings.lock_ttl_seconds / 3

    def keys(self, tenant: str, session_id: str) -> SessionKeys:
        if not SESSION_ID.fullmatch(session_id):
            raise InvalidRequest("session_id must be 1-128 characters of A-Z, a-z, 0-9, '_' or '-'")
        return session_keys(self.settings.redis_prefix, tenant, session_id)

    # Sessions.

    async def create_session(self, tenant: str) -> str:
        while True:
            session_id = secrets.token_urlsafe(24)  # 192 random bits
            if await self.store.create(self.keys(tenant, session_id)):
                return session_id

    async def history(self, tenant: str, session_id: str) -> list[bytes]:
        messages = await self.store.read(self.keys(tenant, session_id))
        if messages is None:
            raise NotFound(f"no session {session_id!r}")
        return messages

    async def delete(self, tenant: str, session_id: str) -> None:
        if not await self.store.delete(self.keys(tenant, session_id)):
            raise NotFound(f"no session {session_id!r}")

    # Turns.

    async def open_turn(self, request: TurnRequest, report: TurnReport) -> Turn:
        """Everything before the 200: on failure raises `ChatError`, holding nothing."""
        started = time.monotonic()
        body = request.body
        upstream_request = self._validate(request)
        report.model = upstream_request.model
        keys = self.keys(request.tenant, request.session_id) if request.session_id is not None else None
        if body.regenerate and keys is None:
            raise InvalidRequest("there is nothing to regenerate without a session")

        snapshot: Snapshot | None = None
        reply: Reply | None = None
        try:
            history: list[dict[str, Any]] = []
            if keys is not None:
                snapshot = await self.store.begin(keys, secrets.token_hex(16))
                if snapshot is None:
                    raise SessionBusy("another turn of this session is in progress; retry when it ends")
                history = snapshot.messages
            user_text = body.message or ""
            if body.regenerate:
                if len(history) < 2 or history[-1]["role"] != "assistant" or history[-2]["role"] != "user":
                    raise InvalidRequest("there is no reply to regenerate in this session")
                user_text = history[-2]["content"]
                history = history[:-2]
            budget = self.settings.context_max_tokens - estimate_tokens(upstream_request.system or "")
            upstream_request.messages = build_context(history, user_text, budget)

            async with asyncio.timeout(self.settings.upstream_timeout_seconds):
                reply = await self.upstream.open(upstream_request)
                report.upstream_request_id = reply.request_id
                chunks = reply.chunks()
                first = await _first_chunk(chunks)
            report.first_token_seconds = time.monotonic() - started
            return Turn(
                self, report, reply, chunks, first, keys, snapshot, user_text, body.regenerate, started
            )
        except TimeoutError as exc:
            await self.release(reply, snapshot)
            report.upstream_error = "timeout"
            raise UpstreamTimeout("Claude sent nothing in time") from exc
        except BaseException as exc:
            if isinstance(exc, ChatError) and exc.upstream_error is not None:
                report.upstream_error = exc.upstream_error
            if reply is not None:
                report.input_tokens = reply.decoder.input_tokens
                report.output_tokens = reply.decoder.output_tokens
            await self.release(reply, snapshot)
            raise

    async def release(self, reply: Reply | None, snapshot: Snapshot | None) -> None:
        # Both steps must run even if the other fails; a lock we cannot release expires on its own.
        if reply is not None:
            try:
                await reply.close()
            except Exception:
                log.debug("closing the upstream reply failed", exc_info=True)
        if snapshot is not None and snapshot.lock.held:
            try:
                await snapshot.lock.release()
            except Exception:
                log.warning("could not release a session lock; it expires on its own", exc_info=True)

    def start(self, report: TurnReport) -> None:
        """A chat request has begun: it counts as in flight until `finish` reports it."""
        self.recorder.begin(report)

    async def finish(self, report: TurnReport) -> None:
        await self.recorder.record(report)

    def _validate(self, request: TurnRequest) -> UpstreamRequest:
        body, settings = request.body, self.settings
        if body.regenerate:
            if body.message is not None:
                raise InvalidRequest("a regenerate request carries no message")
        elif body.message is None or not body.message.strip():
            raise InvalidRequest("message must not be empty")
        elif len(body.message) > settings.max_message_chars:
            raise RequestTooLarge(f"message is over {settings.max_message_chars} characters")
        if body.system is not None and len(body.system) > settings.max_message_chars:
            raise RequestTooLarge(f"system is over {settings.max_message_chars} characters")
        model = body.model or settings.model
        if model not in settings.allowed_models:
            raise InvalidRequest(f"unknown model {model!r}; allowed: {', '.join(settings.allowed_models)}")
        max_tokens = settings.max_tokens if body.max_tokens is None else body.max_tokens
        if not 1 <= max_tokens <= settings.max_tokens_limit:
            raise InvalidRequest(f"max_tokens must be between 1 and {settings.max_tokens_limit}")
        if body.temperature is not None and not 0.0 <= body.temperature <= 1.0:
            raise InvalidRequest("temperature must be between 0 and 1")
        system = body.system if body.system is not None else (settings.system_prompt or None)
        return UpstreamRequest(model, max_tokens, [], system, body.temperature)


async def _first_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        raise UpstreamFailed("Claude returned an empty reply", upstream_error="incomplete") from None
    except ReplyBroken as exc:
        if exc.overloaded:
            raise UpstreamUnavailable(
                "Claude is overloaded; try again later", retry_after=5, upstream_error=exc.kind
            ) from exc
        if exc.timeout:
            raise UpstreamTimeout("Claude sent nothing in time", upstream_error=exc.kind) from exc
        raise UpstreamFailed(f"Claude failed before replying: {exc.reason}", upstream_error=exc.kind) from exc


def _message_id() -> str:
    return "msg_" + secrets.token_hex(12)
