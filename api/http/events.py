"""The ASGI response that runs a turn and relays its reply as Server-Sent Events, in the AI SDK's UI
message stream protocol (v1): `start`, `text-start`, a `text-delta` per piece, `text-end`, `finish`,
then `data: [DONE]`.

Unlike a text reply, an event stream can say that it failed: so it starts as soon as the turn is
admitted and holds its session's lock, and from then on every failure (Claude's, before or during the
reply, a lost lock, a commit refused) is one `error` event, after which the stream ends without
`[DONE]` and nothing is stored. Until the first token, and whenever the reply pauses, a `: ping`
comment goes out every `CHAT_SSE_HEARTBEAT_SECONDS`, so that no proxy closes a quiet connection.
Each event's `id:` is the reply's length in characters so far, where a resumed stream would start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import orjson
from starlette.types import Receive, Scope, Send

from api.errors import ChatError, StreamFailed
from api.http.idempotency import REPLAYED
from api.http.protocol import CLIENT_WRITER, ClientWriter, unwatch_disconnect, watch_disconnect
from api.http.streaming import RAW_SEND, TurnResponse, send_error
from api.outcomes import Outcome
from api.turn.resume import Duplicate
from api.turn.service import Admitted, Turn, message_id

log = logging.getLogger("api.turn.service")

EVENT_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"x-vercel-ai-ui-message-stream", b"v1"),
]
PING = b": ping\n\n"
TEXT_PART = b'"text-0"'  # the reply is a single text part
_FINISH_REASONS = {"max_tokens": "length", "refusal": "content-filter"}


def event(chars: int, data: bytes) -> bytes:
    return b"id: %d\ndata: %b\n\n" % (chars, data)


async def relay_logged(channel: EventChannel, chunks: AsyncIterator[bytes], *, opening: bool) -> None:
    """A reply read back from its log (a resumed reply, or a repeat of an idempotent turn) as events:
    from its start when `opening`, else from the reader's offset, which `channel.chars` holds. Ends
    with `finish` and `[DONE]` once the turn committed; raises `StreamFailed` when it failed."""
    if opening:
        await channel.put(
            event(channel.chars, b'{"type":"start"}')
            + event(channel.chars, b'{"type":"text-start","id":%b}' % TEXT_PART)
        )
    async for chunk in chunks:
        await channel.put(channel.delta(chunk))
    chars = channel.chars
    end = b'{"type":"text-end","id":%b}' % TEXT_PART
    # A reader of the log does not learn why the reply stopped; it did stop, whole and committed.
    finish = b'{"type":"finish","finishReason":"stop"}'
    await channel.put(event(chars, end) + event(chars, finish) + event(chars, b"[DONE]"), more=False)


def wants_events(accept: str | None) -> bool:
    """Whether the client asked for an event stream (`Accept: text/event-stream`)."""
    return accept is not None and "text/event-stream" in accept.lower()


class EventChannel:
    """Writes one stream's events, counting the reply's characters, and pings while it is quiet."""

    __slots__ = ("_beat", "_send", "_writer", "chars", "interval", "last")

    def __init__(self, send: Send, writer: ClientWriter | None, interval: float) -> None:
        self._send = send
        self._writer = writer
        self._beat: asyncio.Task[None] | None = None
        self.interval = interval
        self.chars = 0
        self.last = time.monotonic()

    async def put(self, data: bytes, *, more: bool = True) -> None:
        self.last = time.monotonic()
        if self._writer is not None and more:
            self._writer.write(data)
        else:
            await self._send({"type": "http.response.body", "body": data, "more_body": more})

    def delta(self, text: bytes) -> bytes:
        piece = text.decode()
        self.chars += len(piece)
        payload = b'{"type":"text-delta","id":%b,"delta":%b}' % (TEXT_PART, orjson.dumps(piece))
        return event(self.chars, payload)

    def pusher(self, writer: ClientWriter) -> Callable[[bytes], None]:
        """A function for `Turn.relay`: frames each piece and writes it from the reply's callback."""

        def push(text: bytes) -> None:
            self.last = time.monotonic()
            writer.write(self.delta(text))

        return push

    def start_heartbeat(self) -> None:
        self._beat = asyncio.create_task(self._heartbeat())

    async def stop_heartbeat(self) -> None:
        beat, self._beat = self._beat, None
        if beat is not None:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _heartbeat(self) -> None:
        try:
            while True:
                wait = self.last + self.interval - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    await self.put(PING)
        except Exception:
            # The client is gone (the turn hears it separately) or the server refused the write.
            log.debug("a heartbeat could not be sent", exc_info=True)


class EventStreamResponse(TurnResponse):
    """A turn relayed as a UI message stream; see the module's docstring."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        report = self.report
        started = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        watcher: asyncio.Task[None] | None = None
        if not watch_disconnect(scope, self._client_left):
            watcher = asyncio.create_task(self._watch(receive))
        admitted: Admitted | None = None
        duplicate: Duplicate | None = None
        turn: Turn | None = None
        channel: EventChannel | None = None
        try:
            opened = await self.service.admit_turn(self.request, report)
            if isinstance(opened, Duplicate):
                duplicate = opened
            else:
                admitted = opened
            headers = self.extra_headers + EVENT_HEADERS
            if self.request.quota is not None:
                headers += self.request.quota.headers()
            if duplicate is not None and duplicate.replayed is not None:
                headers.append(REPLAYED)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            writer: ClientWriter | None = scope.get(CLIENT_WRITER)
            if duplicate is not None:
                # A repeat runs nothing: the committed reply, or the live one read from its log.
                report.replayed = True
                channel = EventChannel(send, None, self.service.settings.sse_heartbeat_seconds)
                channel.start_heartbeat()
                await relay_logged(channel, duplicate.chunks(), opening=True)
                report.outcome, report.status = Outcome.SUCCESS, 200
                return
            assert admitted is not None
            channel = EventChannel(
                scope.get(RAW_SEND, send), writer, self.service.settings.sse_heartbeat_seconds
            )
            reply_id = message_id()
            await channel.put(event(0, b'{"type":"start","messageId":%b}' % orjson.dumps(reply_id)))
            channel.start_heartbeat()
            pending, admitted = admitted, None  # from here `open` gives back what the turn holds
            turn = await pending.open()
            turn.reply_id = reply_id
            await channel.put(
                event(0, b'{"type":"text-start","id":%b}' % TEXT_PART) + channel.delta(turn.first)
            )
            relayed = turn.relay(channel.pusher(writer)) if writer is not None else None
            if relayed is not None:
                assert writer is not None
                writer.watch(turn.throttle)
                try:
                    await relayed
                finally:
                    writer.watch(None)
            else:
                async for chunk in turn.chunks():
                    await channel.put(channel.delta(chunk))
            await asyncio.sleep(0)  # let a disconnect that already happened be seen before committing
            if self.disconnected:
                raise asyncio.CancelledError
            self.cancellable = False
            await turn.commit()  # before `finish`, as a text reply commits before its final chunk
            await channel.stop_heartbeat()
            reason = _FINISH_REASONS.get(turn.reply.decoder.stop_reason or "", "stop")
            end = b'{"type":"text-end","id":%b}' % TEXT_PART
            finish = b'{"type":"finish","finishReason":"%b"}' % reason.encode()
            chars = channel.chars
            await channel.put(event(chars, end) + event(chars, finish) + event(chars, b"[DONE]"), more=False)
            report.outcome, report.status = Outcome.SUCCESS, 200
        except ChatError as exc:
            self.cancellable = False
            report.outcome, report.error_type, report.detail = exc.outcome, exc.type, exc.message
            if channel is not None:
                report.status = 200
                await self._fail(channel, exc.message, exc.type)
            else:
                report.status = exc.status
                if not self.disconnected:
                    await send_error(send, exc, self.extra_headers + await self._quota_headers(exc))
        except StreamFailed as exc:
            self.cancellable = False
            report.outcome, report.status, report.detail = exc.outcome, 200, exc.reason
            report.error_type = exc.error_type
            assert channel is not None
            await self._fail(channel, exc.reason, exc.error_type)
        except asyncio.CancelledError:
            if not self.disconnected or task.uncancel() > 0:
                raise
            report.outcome = (
                Outcome.CLIENT_DISCONNECTED_WHILE_STREAMING
                if channel is not None
                else Outcome.CLIENT_DISCONNECTED_BEFORE_STREAMING
            )
            report.status = 200 if channel is not None else 499
        except Exception as exc:
            self.cancellable = False
            log.error("turn %s failed unexpectedly", report.request_id, exc_info=exc)
            report.outcome, report.detail = Outcome.UNKNOWN_ERROR, f"{type(exc).__name__}: {exc}"
            failure = ChatError("the server failed; try again")
            if channel is not None:
                report.status = 200
                await self._fail(channel, failure.message, failure.type)
            else:
                report.status = 500
                await send_error(send, failure, self.extra_headers)
        finally:
            self.cancellable = False
            if channel is not None:
                await channel.stop_heartbeat()
            if watcher is not None:
                watcher.cancel()
            else:
                unwatch_disconnect(scope)
            self._task = None
            if admitted is not None:  # admitted, then cancelled before the reply was asked for
                await self.service.release(admitted.hold)
            if turn is not None:
                await turn.close()
            if duplicate is not None:
                await duplicate.close()
            report.duration_seconds = time.monotonic() - started
            await self.service.finish(report)

    async def _fail(self, channel: EventChannel, message: str, error_type: str) -> None:
        """End the stream with one `error` event and no `[DONE]`: the AI SDK shows it as the chat's error."""
        await channel.stop_heartbeat()
        if self.disconnected:
            return
        payload = orjson.dumps({"type": "error", "errorText": message, "errorType": error_type})
        with contextlib.suppress(OSError):
            await channel.put(event(channel.chars, payload), more=False)
