"""The ASGI response that runs a turn and relays its reply as plain text.

It is a response rather than a route body because the status is not known when the route returns:
the lock, the history and the upstream's first token all come first, and any failure up to there
must still be a proper HTTP error. After the 200, a failure aborts the connection without the final
chunk, so the client sees an incomplete body and never takes a cut reply for a whole one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from api.errors import ChatError, StoreUnavailable, StreamAborted, StreamFailed
from api.http.grace import Grace
from api.http.idempotency import REPLAYED
from api.http.protocol import CLIENT_WRITER, ClientWriter, unwatch_disconnect, watch_disconnect
from api.outcomes import Outcome, TurnReport
from api.turn.resume import Duplicate
from api.turn.service import ChatService, Turn, TurnRequest

log = logging.getLogger("api.turn.service")

STREAM_HEADERS = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


# The server's own `send`, put in the scope by the app before any middleware wraps it (see
# `api.http.app.ChatAPI`). The middlewares only look at a response's start, so the reply's chunks skip
# their wrappers: a few function calls less for every delta of every stream.
RAW_SEND = "chat_api.send"


class TurnResponse(Response):
    def __init__(
        self,
        service: ChatService,
        request: TurnRequest,
        report: TurnReport,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        # Response's own __init__ renders a body up front; this one has none until the turn runs.
        self.status_code = 200
        self.background = None
        self.service = service
        self.request = request
        self.report = report
        self.extra_headers = headers
        self.disconnected = False
        self.cancellable = True
        self._task: asyncio.Task[Any] | None = None
        self._grace = Grace(service.settings.disconnect_grace_seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        report = self.report
        started = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        watcher: asyncio.Task[None] | None = None
        if not watch_disconnect(scope, self._client_left):  # our server calls it; others need a task
            watcher = asyncio.create_task(self._watch(receive))
        turn: Turn | Duplicate | None = None
        streaming = False
        abort = False
        try:
            turn = await self.service.open_turn(self.request, report)
            headers = self.extra_headers + STREAM_HEADERS
            if self.request.quota is not None:
                headers += self.request.quota.headers()
            if isinstance(turn, Duplicate):
                headers.append(REPLAYED)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            streaming = True
            send_body: Send = scope.get(RAW_SEND, send)
            if isinstance(turn, Duplicate):
                report.replayed = True
                async for chunk in turn.chunks():
                    await send_body({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                self._grace.turn = turn
                await send_body({"type": "http.response.body", "body": turn.first, "more_body": True})
                writer: ClientWriter | None = scope.get(CLIENT_WRITER)
                relayed = turn.relay(writer.write) if writer is not None else None
                if relayed is not None:
                    assert writer is not None
                    writer.watch(turn.throttle)  # a slow client holds the upstream back, not our memory
                    try:
                        await relayed
                    finally:
                        writer.watch(None)
                else:
                    async for chunk in turn.chunks():
                        await send_body({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(0)  # let a disconnect that already happened be seen before committing
            if self.disconnected:
                if not isinstance(turn, Turn) or not self._grace.started:
                    raise asyncio.CancelledError
                await turn.reader()  # unless the grace period ends first, and cancels this task
                report.resumed = True
            # The whole reply is written: from here a disconnect must not interrupt the commit
            # half-way. Commit and unlock before the final chunk, so a client that has read the
            # whole reply can send its next turn at once, to any worker.
            self.cancellable = False
            if isinstance(turn, Turn):
                await turn.commit()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            report.outcome, report.status = Outcome.SUCCESS, 200
        except ChatError as exc:
            self.cancellable = False
            if streaming:  # only reachable through a bug: the status line is gone, so cut the reply
                report.outcome, report.detail = Outcome.UNKNOWN_ERROR, exc.message
                abort = True
            else:
                report.outcome, report.status, report.error_type = exc.outcome, exc.status, exc.type
                report.detail = exc.message
                if not self.disconnected:
                    await send_error(send, exc, self.extra_headers + await self._quota_headers(exc))
        except StreamFailed as exc:
            report.outcome, report.status, report.detail = exc.outcome, 200, exc.reason
            abort = True
        except asyncio.CancelledError:
            if not self.disconnected or task.uncancel() > 0:
                raise
            report.outcome = (
                Outcome.CLIENT_DISCONNECTED_WHILE_STREAMING
                if streaming
                else Outcome.CLIENT_DISCONNECTED_BEFORE_STREAMING
            )
            report.status = 200 if streaming else 499
        except Exception as exc:
            log.error("turn %s failed unexpectedly", report.request_id, exc_info=exc)
            report.outcome, report.detail = Outcome.UNKNOWN_ERROR, f"{type(exc).__name__}: {exc}"
            if streaming:
                abort = True
            else:
                report.status = 500
                await send_error(send, ChatError("the server failed; try again"), self.extra_headers)
        finally:
            self.cancellable = False
            self._grace.cancel()
            if watcher is not None:
                watcher.cancel()
            else:
                unwatch_disconnect(scope)
            self._task = None  # the task's frame holds this response: no cycle left for the collector
            if turn is not None:
                await turn.close()
            report.duration_seconds = time.monotonic() - started
            await self.service.finish(report)
        if abort:
            raise StreamAborted(report.detail)

    async def _quota_headers(self, error: ChatError) -> list[tuple[bytes, bytes]]:
        quota = self.request.quota
        # Refused before admission took its look: look now, unless Redis is what failed.
        if quota is None and self.request.subject and not isinstance(error, StoreUnavailable):
            quota = await self.service.quota(self.request.subject, self.request.limits)
        return quota.headers() if quota is not None else []

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        self._client_left()

    def _client_left(self) -> None:
        """Cancel the turn as soon as the client goes away, so the upstream stream closes at once;
        or, with a grace period, once it is over with no reader come for the reply."""
        self.disconnected = True
        if self.cancellable and self._task is not None and not self._grace.begin(self._cancel):
            self._task.cancel()

    def _cancel(self) -> None:
        if self.cancellable and self._task is not None:
            self._task.cancel()


async def send_error(send: Send, error: ChatError, headers: list[tuple[bytes, bytes]]) -> None:
    body = error.body()
    extra = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.retry_after is not None:
        extra.append((b"retry-after", b"%d" % max(1, math.ceil(error.retry_after))))
    start: Message = {"type": "http.response.start", "status": error.status, "headers": headers + extra}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
