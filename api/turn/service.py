"""One chat turn, end to end: validate -> lock and read history -> open the reply -> relay -> commit.

Until `open_turn` returns, every failure is a `ChatError` and leaves Redis as it was. After that, the
caller relays `Turn.chunks()` and then calls `Turn.commit()`; whatever happens, it calls `Turn.close()`,
which gives back the lock and the upstream connection unless the commit already did.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from api.config import Settings
from api.errors import (
    ChatError,
    IdempotencyMismatch,
    InvalidRequest,
    NotFound,
    RateLimited,
    RequestTooLarge,
    SessionBusy,
    StreamFailed,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from api.outcomes import Outcome, OutcomeRecorder, TurnReport
from api.store.admission import Admission, Limits, Quota, Ticket
from api.store.history import (
    CommitRefused,
    CommitUnconfirmed,
    Page,
    SessionStore,
    Snapshot,
    redis_errors,
    stored_message,
)
from api.store.idempotency import Committed, Idempotency, InFlight, Mismatch, record_key
from api.store.keys import SessionKeys, session_keys
from api.store.renewals import Renewer
from api.store.replies import FAILED, CommitTail, ReplyLogs
from api.store.scripts import ScriptCall, run_together
from api.store.usage import TurnUsage
from api.turn.context import build_context, estimate_tokens
from api.turn.resume import Duplicate, Follower, ReplyTap, new_token, protocol_of
from api.turn.schemas import ChatRequest
from api.turn.slots import GenerationSlots
from api.turn.usage import UsageReport, usage_report
from api.upstream.client import Reply, ReplyBroken, Upstream, UpstreamRequest
from api.upstream.direct import backoff

log = logging.getLogger("api.turn.service")

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
PAGE_LIMIT = re.compile(r"[0-9]{1,6}")


def check_session_id(session_id: str) -> str:
    """The id as given, or `InvalidRequest`. Nothing else is ever done with an id that fails this:
    it reaches no response header, log line or Redis key."""
    if not SESSION_ID.fullmatch(session_id):
        raise InvalidRequest("session_id must be 1-128 characters of A-Z, a-z, 0-9, '_' or '-'")
    return session_id


@dataclass(slots=True)
class TurnRequest:
    tenant: str
    session_id: str | None
    body: ChatRequest | None  # taken by `ChatService.open_turn`
    subject: str = ""  # whose limits apply; see `api.http.auth.Caller`
    limits: Limits | None = None  # the subject's own limits; None: the CHAT_RATE_LIMIT_* defaults
    quota: Quota | None = None  # the request limit as admission left it, for the response headers
    protocol: str = "text"  # what the reply is sent as; a resumed reply is sent the same way
    idempotency_key: str | None = None


@dataclass(slots=True, eq=False)  # compared and hashed by identity: the renewer keeps a set of them
class Hold:
    """What a turn holds until it ends; `ChatService.release` gives it all back, whatever happened."""

    slot: bool = False  # one of this worker's generation slots
    ticket: Ticket | None = None  # the caller's stream lease, and the tokens still to charge
    snapshot: Snapshot | None = None  # the session lock
    reply: Reply | None = None  # the upstream connection
    relayed: int = 0  # bytes of reply text written: what a reply that ends early cost, at least
    lost: bool = False  # the renewer found the session lock taken by another turn
    admission: Admission | None = None  # whose lease script renews the ticket
    keys: SessionKeys | None = None
    claim: str | None = None  # the idempotency record this turn claimed
    fingerprint: str = ""  # of the request's body, kept with that record
    tap: ReplyTap | None = None  # writes the reply for readers, once one asked
    parts: bytearray | None = None  # the reply so far, once it began
    reader: asyncio.Future[None] | None = None  # resolved when a reader asks
    model: str = ""  # whose usage the turn's settlement counts

    def renewals(self) -> tuple[ScriptCall | None, ScriptCall | None]:
        lock = self.snapshot.lock.renew_call() if self.snapshot is not None else None
        ticket, admission = self.ticket, self.admission
        lease = None
        if ticket is not None and ticket.leased and admission is not None:
            lease = admission.renew_call(ticket)
        return lock, lease

    def usage(self) -> TurnUsage | None:
        """What the turn used, for its settlement; None if it never reached Claude."""
        if self.reply is None:
            return None
        decoder = self.reply.decoder
        output = decoder.output_tokens
        if not decoder.done:  # the final usage never came; the text sent was paid for all the same
            output = max(output, (self.relayed + 3) // 4)
        return TurnUsage(
            self.model,
            decoder.input_tokens,
            output,
            decoder.cache_read_input_tokens,
            decoder.cache_creation_input_tokens,
        )


def report_usage(report: TurnReport, reply: Reply) -> None:
    decoder = reply.decoder
    report.input_tokens = decoder.input_tokens
    report.output_tokens = decoder.output_tokens
    report.cache_read_input_tokens = decoder.cache_read_input_tokens
    report.cache_creation_input_tokens = decoder.cache_creation_input_tokens


class Turn:
    """A turn whose reply has begun: the first chunk is in hand and the session (if any) is locked.

    The rest of the reply is relayed either by pulling it (`chunks()`) or, where the reply can push
    it, by `relay()`: each piece is then written from the upstream connection's own callback, and
    nothing is woken per delta but the kernel.
    """

    __slots__ = (
        "_done",
        "_parts",
        "_service",
        "_started",
        "_write",
        "first",
        "hold",
        "keys",
        "regenerate",
        "reply",
        "reply_id",
        "report",
        "snapshot",
        "user_text",
    )

    def __init__(
        self,
        service: ChatService,
        report: TurnReport,
        hold: Hold,
        first: bytes,
        keys: SessionKeys | None,
        user_text: str,
        regenerate: bool,
        started: float,
    ) -> None:
        assert hold.reply is not None
        self._service = service
        self.report = report
        self.hold = hold
        self.reply = hold.reply
        self.first = first
        self.keys = keys
        self.snapshot = hold.snapshot
        self.user_text = user_text
        self.regenerate = regenerate
        self._started = started  # when the history was read, on this worker's clock
        # Only a session turn needs the text back for its commit: one growing buffer, not an
        # object per delta.
        self._parts: bytearray | None = bytearray(first) if keys is not None else None
        hold.parts = self._parts
        if hold.tap is not None and self._parts is not None:  # a reader came before the first text
            hold.tap.feed(self._parts)
        self._done: asyncio.Future[None] | None = None
        self._write: Callable[[bytes], None] | None = None
        self.reply_id: str | None = None  # the stored reply's id, when the client was already told it

    async def chunks(self) -> AsyncIterator[bytes]:
        """The rest of the reply, pulled. Raises `StreamFailed` if it cannot be completed."""
        reply = self.reply
        try:
            while chunk := await reply.next_text():
                # Counted before it is handed on: a client that leaves stops this generator at a
                # `yield`, where no `finally` of ours would run before the turn is settled.
                self._take(chunk)
                yield chunk
                if self.hold.lost:  # the commit would be refused: stop paying for the reply now
                    raise StreamFailed("the session lock was lost", Outcome.UNKNOWN_ERROR, "session_busy")
        except ReplyBroken as exc:
            self.report.upstream_error = exc.kind
            raise StreamFailed(exc.reason) from exc

    def relay(self, write: Callable[[bytes], None]) -> asyncio.Future[None] | None:
        """Have the rest of the reply pushed to `write` as it arrives. The future resolves once the
        reply completed (all of it written) or fails with `StreamFailed`; None where the reply can
        only be pulled, and `chunks()` must be used instead."""
        done = self._done = asyncio.get_running_loop().create_future()
        self._write = write
        if not self.reply.pipe(self._relayed, self._ended):
            self._done = self._write = None
            return None
        return done  # not self._done: a reply already whole has resolved it, and let go of it

    def throttle(self, paused: bool) -> None:
        """The client cannot take more for now (or can again): hold the upstream back meanwhile."""
        self.reply.throttle(paused)

    def _take(self, chunk: bytes) -> None:
        hold = self.hold
        hold.relayed += len(chunk)
        if self._parts is not None:
            self._parts += chunk
            if hold.tap is not None:
                hold.tap.grew()

    @property
    def followed(self) -> bool:
        """A reader on some worker asked for this reply."""
        return self.hold.tap is not None

    async def reader(self) -> None:
        """Wait until a reader asks for this reply (at once if one has)."""
        if self.hold.tap is None:
            if self.hold.reader is None:
                self.hold.reader = asyncio.get_running_loop().create_future()
            await self.hold.reader

    def _relayed(self, chunk: bytes) -> None:
        done = self._done
        if done is None or done.done():
            return
        self._take(chunk)
        assert self._write is not None
        self._write(chunk)
        if self.hold.lost:
            self._ended(
                None, StreamFailed("the session lock was lost", Outcome.UNKNOWN_ERROR, "session_busy")
            )

    def _ended(self, broken: ReplyBroken | None, failed: StreamFailed | None = None) -> None:
        done, self._done, self._write = self._done, None, None
        if done is None or done.done():  # cancelled: the client left and the turn is being undone
            return
        if broken is not None:
            self.report.upstream_error = broken.kind
            failed = StreamFailed(broken.reason)
            failed.__cause__ = broken
        if failed is not None:
            done.set_exception(failed)
        else:
            done.set_result(None)

    async def commit(self) -> None:
        """Store the user message and the reply together, or raise `StreamFailed` having stored nothing."""
        if self.keys is None or self.snapshot is None or self._parts is None:
            return
        store = self._service.store
        assert store is not None
        snapshot = self.snapshot
        reply_ms = snapshot.now_ms + int((time.monotonic() - self._started) * 1000)
        reply_text = self._parts.decode()
        messages: list[bytes] = []
        if not self.regenerate:
            messages.append(
                stored_message(
                    message_id(), "user", self.user_text, snapshot.now_ms, estimate_tokens(self.user_text)
                )
            )
        output_tokens = self.reply.decoder.output_tokens or estimate_tokens(reply_text)
        reply_id = self.reply_id or message_id()
        messages.append(stored_message(reply_id, "assistant", reply_text, reply_ms, output_tokens))
        # The turn's limits and usage are settled in the commit's round trip: one fewer on every turn.
        ticket = self.hold.ticket
        also = [] if ticket is None else [self._service.admission.settle_call(ticket, self.hold.usage())]
        tail = await self._service.commit_tail(self.hold, self.keys, snapshot.lock.token)
        self._service.renewer.discard(self.hold)  # the commit releases the lock and the lease itself
        try:
            settled = await store.commit(
                self.keys,
                snapshot,
                snapshot.lock.token,
                messages,
                replace_last=self.regenerate,
                tail=tail,
                also=also,
            )
        except CommitRefused as exc:
            raise StreamFailed(exc.reason, Outcome.UNKNOWN_ERROR, "session_busy") from exc
        except CommitUnconfirmed as exc:
            # Stored on the primary, but a failover could still lose it: the reply ends without its
            # final chunk, so the client sends the turn again rather than trust a turn that may vanish.
            if ticket is not None and exc.results and not isinstance(exc.results[0], Exception):
                ticket.settled = True
            raise StreamFailed(str(exc), Outcome.UNKNOWN_ERROR, "unavailable") from exc
        except ChatError as exc:
            raise StreamFailed(exc.message, Outcome.UNKNOWN_ERROR, exc.type) from exc
        self.report.committed = True
        if ticket is not None and not isinstance(settled[0], Exception):
            ticket.settled = True

    async def close(self) -> None:
        """Give back what the turn holds. Safe to call on every path, once."""
        report_usage(self.report, self.reply)
        await self._service.release(self.hold)


class Admitted:
    """A turn admitted and holding its session's lock, whose reply has not been asked for yet."""

    __slots__ = (
        "_service",
        "begun",
        "hold",
        "keys",
        "regenerate",
        "report",
        "request",
        "started",
        "user_text",
    )

    def __init__(
        self,
        service: ChatService,
        report: TurnReport,
        hold: Hold,
        request: UpstreamRequest,
        keys: SessionKeys | None,
        user_text: str,
        regenerate: bool,
        started: float,
        begun: float,
    ) -> None:
        self._service = service
        self.report = report
        self.hold = hold
        self.request = request
        self.keys = keys
        self.user_text = user_text
        self.regenerate = regenerate
        self.started = started
        self.begun = begun

    async def open(self) -> Turn:
        """Ask for the reply and wait for its first text. On failure raises `ChatError`, having given
        back everything the turn held."""
        service, hold, report = self._service, self.hold, self.report
        try:
            async with asyncio.timeout(service.settings.upstream_timeout_seconds):
                first = await service._first_text(self.request, hold, report)
            hold.relayed = len(first)
            report.first_token_seconds = time.monotonic() - self.started
            return Turn(service, report, hold, first, self.keys, self.user_text, self.regenerate, self.begun)
        except TimeoutError as exc:
            await service.release(hold)
            report.upstream_error = "timeout"
            raise UpstreamTimeout("Claude sent nothing in time") from exc
        except BaseException as exc:
            if isinstance(exc, ChatError) and exc.upstream_error is not None:
                report.upstream_error = exc.upstream_error
            if hold.reply is not None:
                report_usage(report, hold.reply)
            await service.release(hold)
            raise


class ChatService:
    def __init__(
        self,
        settings: Settings,
        store: SessionStore,
        upstream: Upstream,
        recorder: OutcomeRecorder,
        admission: Admission,
        slots: GenerationSlots | None = None,
        renewer: Renewer | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.upstream = upstream
        self.recorder = recorder
        self.admission = admission
        self.slots = slots
        self.renewer = renewer or Renewer(
            store.redis, settings.lock_ttl_seconds / 3, store.on_error, store.bundle
        )
        lock_ttl_ms = store.lock_ttl_ms
        self.replies = ReplyLogs(
            store.redis, store.scripts, settings.redis_prefix, lock_ttl_ms, store.on_error
        )
        self.idempotency = Idempotency(store, settings.idempotency_ttl_seconds)
        # How long a reader waits on the log before it checks that the turn is still in flight.
        self.follow_block_ms = max(50, min(1000, lock_ttl_ms // 4))
        self.live: dict[str, Hold] = {}  # this worker's session turns in flight, by lock token
        self._listener: asyncio.Task[None] | None = None

    # Readers of replies in flight.

    async def start_listening(self) -> None:
        """Hear readers that ask for a reply this worker produces (until `stop_listening`)."""
        ready = asyncio.Event()
        self._listener = asyncio.get_running_loop().create_task(self.replies.listen(self.reader_asked, ready))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.redis_timeout_seconds):
                await ready.wait()  # else it keeps trying; readers ask again until heard

    async def stop_listening(self) -> None:
        task, self._listener = self._listener, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def reader_asked(self, token: str) -> None:
        if self.settings.reply_log == "off":
            return
        hold = self.live.get(token)
        if hold is None or hold.tap is not None or hold.keys is None:
            return
        hold.tap = ReplyTap(self.replies, hold.keys.reply_log(token), protocol_of(token))
        if hold.parts is not None:
            hold.tap.feed(hold.parts)
        if hold.reader is not None and not hold.reader.done():
            hold.reader.set_result(None)

    async def follow(self, tenant: str, session_id: str, offset: int) -> Follower | None:
        """A reader of the session's turn in flight, from `offset` characters; None when none is."""
        keys = self.keys(tenant, session_id)
        if self.settings.reply_log == "off":
            return None
        async with redis_errors(self.store.on_error):
            token = await self.replies.attach(keys)
            if token is None:
                return None
            await self.replies.ask(token)
        return Follower(self.replies, keys, token, offset, self.follow_block_ms)

    async def commit_tail(self, hold: Hold, keys: SessionKeys, token: str) -> CommitTail:
        tap, tail = hold.tap, CommitTail(keys.readers(), keys.reply_log(token))
        if tap is not None:
            text, size = await tap.finish()
            tail = CommitTail(tail.readers, tail.log, True, text, size)
        if hold.claim is not None:
            tail = replace(
                tail,
                idempotency=hold.claim,
                fingerprint=hold.fingerprint,
                idempotency_ttl_ms=self.idempotency.ttl_ms,
            )
        return tail

    def keys(self, tenant: str, session_id: str) -> SessionKeys:
        return session_keys(self.settings.redis_prefix, tenant, check_session_id(session_id))

    # Sessions.

    async def create_session(self, tenant: str) -> str:
        while True:
            session_id = secrets.token_urlsafe(24)  # 192 random bits
            if await self.store.create(self.keys(tenant, session_id)):
                return session_id

    async def history(self, tenant: str, session_id: str, limit: str | None, before: str | None) -> Page:
        """A page of the history, newest page first; `limit` and `before` as the query string gave them."""
        keys = self.keys(tenant, session_id)
        most = self.settings.history_page_max
        if limit is None:
            size = self.settings.history_page_size
        elif PAGE_LIMIT.fullmatch(limit) and 1 <= int(limit) <= most:
            size = int(limit)
        else:
            raise InvalidRequest(f"limit must be a whole number from 1 to {most}")
        if before is not None and not MESSAGE_ID.fullmatch(before):
            raise InvalidRequest("before must be a message id from this session's history")
        try:
            page = await self.store.read_page(keys, size, before)
        except KeyError:
            raise InvalidRequest(f"no message {before!r} in this session's history") from None
        if page is None:
            raise NotFound(f"no session {session_id!r}")
        return page

    async def usage(self, subject: str, start: str | None, end: str | None) -> UsageReport:
        """The caller's usage per day and model; `start` and `end` as the query string gave them."""
        settings = self.settings
        async with redis_errors(self.store.on_error):
            return await usage_report(
                self.store.redis, settings.redis_prefix, subject, start, end, settings.usage_retention_days
            )

    async def delete(self, tenant: str, session_id: str) -> None:
        if not await self.store.delete(self.keys(tenant, session_id)):
            raise NotFound(f"no session {session_id!r}")

    # Turns.

    async def open_turn(self, request: TurnRequest, report: TurnReport) -> Turn | Duplicate:
        """Everything before the 200: on failure raises `ChatError`, holding nothing. The request's
        body is taken from it: the turn keeps what it needs, and an open stream not the rest.

        A repeat of a turn sent with the same idempotency key runs nothing: it is a `Duplicate`,
        which holds what admission gave it until it is closed."""
        admitted = await self.admit_turn(request, report)
        if isinstance(admitted, Duplicate):
            return admitted
        return await admitted.open()

    async def admit_turn(self, request: TurnRequest, report: TurnReport) -> Admitted | Duplicate:
        """The turn's first half: validated, admitted, the session locked and its context built. On
        failure raises `ChatError`, holding nothing; else `Admitted.open()` asks for the reply, or,
        for a repeat of an idempotent turn, the `Duplicate` that answers it."""
        started = time.monotonic()
        body, request.body = request.body, None
        assert body is not None, "a turn request is opened once"
        upstream_request = self._validate(body)
        report.model = upstream_request.model
        keys = self.keys(request.tenant, request.session_id) if request.session_id is not None else None
        if body.regenerate and keys is None:
            raise InvalidRequest("there is nothing to regenerate without a session")

        hold = Hold(keys=keys, model=upstream_request.model)
        if keys is not None and request.idempotency_key is not None:
            hold.claim = record_key(keys, request.idempotency_key)
            hold.fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()[:32]
        try:
            # The worker's slot comes first: a request waiting for one has not yet used any of its limits.
            if self.slots is not None:
                await self.slots.take()
                hold.slot = True
            duplicate = await self._admit_and_lock(request, keys, hold)
            if duplicate is not None:
                return duplicate
            history: list[dict[str, Any]] = []
            begun = started
            if hold.snapshot is not None:
                begun = time.monotonic()
                history = hold.snapshot.messages
                # Past the context built below the history is not needed: an open stream should not
                # keep a whole session's messages in memory.
                hold.snapshot.messages = []
            self._keep_alive(hold)
            user_text = body.message or ""
            # This turn's commit drops the oldest stored message: the context's start moves with it.
            capped = not body.regenerate and len(history) + 2 > self.settings.history_max_messages
            if body.regenerate:
                if len(history) < 2 or history[-1]["role"] != "assistant" or history[-2]["role"] != "user":
                    raise InvalidRequest("there is no reply to regenerate in this session")
                user_text = history[-2]["content"]
                history = history[:-2]
            budget = self.settings.context_max_tokens - estimate_tokens(upstream_request.system or "")
            upstream_request.messages = build_context(
                history, user_text, budget, stable=self.settings.prompt_cache == "auto", capped=capped
            )
        except BaseException:
            await self.release(hold)
            raise
        return Admitted(
            self, report, hold, upstream_request, keys, user_text, body.regenerate, started, begun
        )

    async def _first_text(self, request: UpstreamRequest, hold: Hold, report: TurnReport) -> bytes:
        """Open the reply and wait for its first text. A reply that fails before any text reached the
        client is asked for again, with the SDK's own backoff: its retries end at the 200, and the
        API reports overload in the stream too (`overloaded_error` right after `message_start`)."""
        for attempt in range(self.settings.upstream_max_retries + 1):
            if hold.reply is not None:
                await hold.reply.close()
                await asyncio.sleep(backoff(attempt - 1))
            hold.reply = await self.upstream.open(request)
            report.upstream_request_id = hold.reply.request_id
            try:
                first = await hold.reply.next_text()
            except ReplyBroken as exc:
                if exc.kind not in RETRYABLE or attempt == self.settings.upstream_max_retries:
                    raise first_text_error(exc) from exc
                log.info("retrying a reply that failed before its first text: %s", exc.reason)
                continue
            if not first:
                raise UpstreamFailed("Claude returned an empty reply", upstream_error="incomplete")
            return first
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def _admit_and_lock(
        self, request: TurnRequest, keys: SessionKeys | None, hold: Hold
    ) -> Duplicate | None:
        """Take from the caller's limits, then, for a session, take its lock and read its history.
        The limits go first, so that a request they refuse never touches its session."""
        token = new_token(request.protocol)
        limits = self.admission.limits(request.limits)
        store, began = self.store, False
        if keys is not None and hold.claim is None and not limits.unlimited and store.bundle is not None:
            # One round trip where one script can reach both: the lock is taken only once admitted.
            decision, reply = await self.admission.admit_then(
                request.subject,
                limits,
                store.begin_call(keys, token),
                store.release_call(keys, token),
                store.bundle,
            )
            if reply is not None:
                hold.snapshot, began = store.snapshot(keys, token, reply), True
        else:
            decision = await self.admission.admit(request.subject, limits)
        request.quota = decision.quota
        if not decision.allowed:
            raise RateLimited(decision.message, retry_after=decision.retry_after)
        hold.ticket = decision.ticket
        if keys is None:
            return None
        if began:
            pass  # the lock was taken, or found busy, in admission's own script
        elif hold.claim is None:
            hold.snapshot = await self.store.begin(keys, token)
        else:
            claim = await self.idempotency.begin(keys, hold.claim, token, hold.fingerprint)
            if not isinstance(claim, Snapshot):
                hold.claim = None  # not this request's to give back
            if isinstance(claim, Mismatch):
                raise IdempotencyMismatch(
                    "this Idempotency-Key was used with another request body; use a new key"
                )
            if isinstance(claim, Committed):
                return Duplicate(claim.reply, None, lambda: self.release(hold))
            if isinstance(claim, InFlight):
                async with redis_errors(self.store.on_error):
                    await self.replies.attach(keys, claim.token)
                    await self.replies.ask(claim.token)
                follower = Follower(self.replies, keys, claim.token, 0, self.follow_block_ms)
                return Duplicate(None, follower, lambda: self.release(hold))
            hold.snapshot = claim
        if hold.snapshot is None:
            raise SessionBusy("another turn of this session is in progress; retry when it ends")
        self.live[token] = hold
        if self.settings.reply_log == "always":
            self.reader_asked(token)
        return None

    async def quota(self, subject: str, limits: Limits | None = None) -> Quota | None:
        """The request limit as it stands, for a response refused before admission; None if unknown."""
        try:
            return await self.admission.peek(subject, limits)
        except Exception:
            log.debug("could not read the limits for a refused request", exc_info=True)
            return None

    def _keep_alive(self, hold: Hold) -> None:
        if hold.snapshot is not None or (hold.ticket is not None and hold.ticket.leased):
            hold.admission = self.admission
            self.renewer.add(hold)

    async def release(self, hold: Hold) -> None:
        # Every step runs even if another fails; a lock or a lease we cannot give back expires on its own.
        self.renewer.discard(hold)
        token = hold.snapshot.lock.token if hold.snapshot is not None else None
        if token is not None:
            self.live.pop(token, None)
        try:
            if hold.reply is not None:
                try:
                    await hold.reply.close()
                except Exception:
                    log.debug("closing the upstream reply failed", exc_info=True)
        finally:
            if hold.slot and self.slots is not None:
                hold.slot = False
                self.slots.give_back()
        calls: list[ScriptCall] = []
        if hold.snapshot is not None and hold.snapshot.lock.held:
            # Not committed: its readers hear that it failed, and a retry with its key runs anew.
            if hold.tap is not None:
                calls += await hold.tap.end_calls(FAILED)
            if hold.claim is not None:
                calls.append(self.idempotency.release_call(hold.claim, hold.snapshot.lock.token))
            calls.append(hold.snapshot.lock.release_call())
        if hold.ticket is not None and not hold.ticket.settled:
            hold.ticket.settled = True
            usage = hold.usage()
            # With no limits there is no lease to give back: only a turn that reached Claude is settled.
            if hold.ticket.leased or usage is not None:
                calls.append(self.admission.settle_call(hold.ticket, usage))
        if not calls:
            return
        try:
            # Shielded: a client leaving mid-cleanup must not leave the session locked for a ttl.
            results = await asyncio.shield(run_together(self.store.redis, calls, bundle=self.store.bundle))
        except Exception:
            if self.store.on_error is not None:
                self.store.on_error()
            log.warning("could not release a turn's lock or lease; they expire on their own", exc_info=True)
            return
        for result in results:
            if isinstance(result, Exception):
                log.warning("could not release a turn's lock or lease: %s", result)

    def start(self, report: TurnReport) -> None:
        """A chat request has begun: it counts as in flight until `finish` reports it."""
        self.recorder.begin(report)

    async def finish(self, report: TurnReport) -> None:
        await self.recorder.record(report)

    def _validate(self, body: ChatRequest) -> UpstreamRequest:
        settings = self.settings
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


# Failures before the first text that another attempt may not meet: what the SDK would retry had it
# seen them as a status (overloaded, a 5xx `api_error`, a dropped connection or cut reply).
RETRYABLE = frozenset({"overloaded", "error_event", "connection", "incomplete"})


def first_text_error(exc: ReplyBroken) -> ChatError:
    if exc.overloaded:
        return UpstreamUnavailable(
            "Claude is overloaded; try again later", retry_after=5, upstream_error=exc.kind
        )
    if exc.timeout:
        return UpstreamTimeout("Claude sent nothing in time", upstream_error=exc.kind)
    return UpstreamFailed(f"Claude failed before replying: {exc.reason}", upstream_error=exc.kind)


def message_id() -> str:
    """A new id for a stored message."""
    return "msg_" + secrets.token_hex(12)
