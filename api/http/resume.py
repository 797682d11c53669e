"""Resuming a reply: `GET /chat/{id}/stream`.

A resumed reply is sent as its turn's original response is, in the protocol the turn was started
with unless `Accept` names one. As text: chunk by chunk as it is generated, the final chunk only once
the turn committed, and cut without it when the turn fails. As the UI message stream: `text-delta`
events whose `id:` counts characters (so `Last-Event-ID` resumes where a stream stopped), `finish`
and `[DONE]` once the turn committed, one `error` event when it failed, `: ping` while it is quiet.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Response
from starlette.types import Receive, Scope, Send

from api.errors import InvalidRequest, StreamAborted, StreamFailed
from api.http.auth import Caller
from api.http.events import EVENT_HEADERS, EventChannel, event, relay_logged
from api.http.protocol import unwatch_disconnect, watch_disconnect
from api.http.routes import _ERRORS, SessionIdPath, caller, chat_service
from api.http.streaming import STREAM_HEADERS
from api.turn.resume import Follower
from api.turn.service import ChatService

router = APIRouter()


class FollowResponse(Response):
    """Sends a reply as it is read from its log; stops reading as soon as the client leaves."""

    def __init__(self, chunks: AsyncIterator[bytes], headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = 200
        self.background = None
        self.chunks = chunks
        self.extra_headers = headers
        self._task: asyncio.Task[Any] | None = None
        self._left = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._task = asyncio.current_task()
        watcher: asyncio.Task[None] | None = None
        if not watch_disconnect(scope, self._client_left):
            watcher = asyncio.create_task(self._watch(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.extra_headers})
            await self.relay(send)
        except asyncio.CancelledError:
            assert self._task is not None
            if not self._left or self._task.uncancel() > 0:
                raise
        finally:
            if watcher is not None:
                watcher.cancel()
            else:
                unwatch_disconnect(scope)
            self._task = None

    async def relay(self, send: Send) -> None:
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except StreamFailed as exc:
            raise StreamAborted(exc.reason) from exc
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._client_left()

    def _client_left(self) -> None:
        self._left = True
        if self._task is not None:
            self._task.cancel()


class FollowEvents(FollowResponse):
    """The same, as the AI SDK's UI message stream, from `offset` characters."""

    def __init__(
        self, chunks: AsyncIterator[bytes], headers: list[tuple[bytes, bytes]], offset: int, heartbeat: float
    ) -> None:
        super().__init__(chunks, headers)
        self.offset = offset
        self.heartbeat = heartbeat

    async def relay(self, send: Send) -> None:
        channel = EventChannel(send, None, self.heartbeat)
        channel.chars = self.offset
        channel.start_heartbeat()
        try:
            await relay_logged(channel, self.chunks, opening=self.offset == 0)
        except StreamFailed as exc:
            await channel.stop_heartbeat()
            error = orjson.dumps({"type": "error", "errorText": exc.reason, "errorType": exc.error_type})
            await send(
                {"type": "http.response.body", "body": event(channel.chars, error), "more_body": False}
            )
        finally:
            await channel.stop_heartbeat()


def chosen_protocol(accept: str | None, follower: Follower) -> str:
    """The protocol `Accept` names, else the one the turn was started with."""
    accept = (accept or "").lower()
    if "text/event-stream" in accept:
        return "sse"
    if "text/plain" in accept:
        return "text"
    return follower.protocol


_RESUMED: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/plain": {"schema": {"type": "string"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
        "description": "The reply of the turn in flight, from `offset`, then live",
    },
    204: {"description": "No turn of this session is in flight"},
}


@router.get(
    "/chat/{session_id}/stream",
    response_class=Response,
    responses={**_RESUMED, **_ERRORS},
    summary="Follow the reply of the session's turn in flight, from any worker",
)
async def resume_stream(
    session_id: SessionIdPath,
    chat: Annotated[ChatService, Depends(chat_service)],
    who: Annotated[Caller, Depends(caller)],
    offset: Annotated[str, Query(description="Characters of the reply to skip")] = "0",
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
    last_event_id: Annotated[
        str | None, Header(description="An event stream's last `id:`: the characters already received")
    ] = None,
) -> Response:
    if last_event_id is not None:
        offset = last_event_id.strip()
    if not offset.isascii() or not offset.isdigit() or len(offset) > 12:
        raise InvalidRequest("offset (or Last-Event-ID) must be a whole number of characters, 0 or more")
    follower = await chat.follow(who.tenant, session_id, int(offset))
    if follower is None:
        return Response(status_code=204)
    session = (b"x-session-id", session_id.encode())
    if chosen_protocol(accept, follower) == "sse":
        return FollowEvents(
            follower.chunks(),
            [*EVENT_HEADERS, session],
            int(offset),
            chat.settings.sse_heartbeat_seconds,
        )
    return FollowResponse(follower.chunks(), [*STREAM_HEADERS, session])
