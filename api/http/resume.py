"""Resuming a reply: `GET /chat/{id}/stream`.

A resumed reply is sent as its turn's original response is: chunk by chunk as it is generated, the
final chunk only once the turn committed, and cut without it when the turn fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from starlette.types import Receive, Scope, Send

from api.errors import InvalidRequest, StreamAborted, StreamFailed
from api.http.auth import Caller
from api.http.protocol import unwatch_disconnect, watch_disconnect
from api.http.routes import _ERRORS, SessionIdPath, caller, chat_service
from api.http.streaming import STREAM_HEADERS
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
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except StreamFailed as exc:
            raise StreamAborted(exc.reason) from exc
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

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._client_left()

    def _client_left(self) -> None:
        self._left = True
        if self._task is not None:
            self._task.cancel()


_RESUMED: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/plain": {"schema": {"type": "string"}}},
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
) -> Response:
    if not offset.isascii() or not offset.isdigit() or len(offset) > 12:
        raise InvalidRequest("offset must be a whole number of characters, 0 or more")
    follower = await chat.follow(who.tenant, session_id, int(offset))
    if follower is None:
        return Response(status_code=204)
    return FollowResponse(follower.chunks(), [*STREAM_HEADERS, (b"x-session-id", session_id.encode())])
