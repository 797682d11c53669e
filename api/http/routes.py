"""HTTP only: parse the request, call the chat service, shape the response."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from api.errors import (
    AuthenticationFailed,
    ChatError,
    InvalidRequest,
    RequestTooLarge,
    StreamAborted,
    Unavailable,
    UnsupportedMediaType,
    ValidationFailed,
    error_body,
)
from api.http.auth import Caller
from api.http.events import EventStreamResponse, wants_events
from api.http.idempotency import idempotency_key
from api.http.state import AppState
from api.http.streaming import TurnResponse
from api.ops.metrics import CONTENT_TYPE
from api.outcomes import Outcome, TurnReport
from api.turn.schemas import ChatRequest, ErrorBody, NewSession, SessionHistory, Usage
from api.turn.service import SESSION_ID, ChatService, TurnRequest, check_session_id

log = logging.getLogger("api")

# The session id of `POST /chat`, which its body names (as the AI SDK sends it).
FROM_BODY = "\x00body"


def app_state(request: Request) -> AppState:
    state: AppState = request.state.app
    return state


# Dependencies are `async def`: FastAPI runs a plain `def` dependency in a thread, a hand-off that
# costs more than the whole of what these do, on every request.


async def state_dependency(request: Request) -> AppState:
    return app_state(request)


async def chat_service(request: Request) -> ChatService:
    return app_state(request).chat


_bearer = HTTPBearer(
    auto_error=False, description="An API key from CHAT_API_KEYS (needed when any is configured)"
)
_api_key = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The same key, for clients that cannot send Bearer"
)


async def presented_key(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> str | None:
    # When both are sent, Authorization wins, as it does at most gateways.
    return bearer.credentials if bearer is not None else api_key


KeyDep = Annotated[str | None, Depends(presented_key)]


def identify(request: Request, key: str | None) -> Caller:
    forwarded = ",".join(request.headers.getlist("x-forwarded-for")) or None
    peer = request.client.host if request.client is not None else None
    return app_state(request).auth.identify(key, peer, forwarded)


async def caller(request: Request, key: KeyDep) -> Caller:
    return identify(request, key)


async def request_id(request: Request) -> str:
    rid: str = request.state.request_id
    return rid


StateDep = Annotated[AppState, Depends(state_dependency)]
ChatDep = Annotated[ChatService, Depends(chat_service)]
CallerDep = Annotated[Caller, Depends(caller)]
# Documented, not enforced here: the chat service refuses a bad id with the 400 the API promises.
SessionIdPath = Annotated[
    str,
    Path(
        description="1-128 characters of A-Z, a-z, 0-9, '_' or '-'",
        json_schema_extra={"pattern": f"^{SESSION_ID.pattern}$"},
    ),
]
RequestIdDep = Annotated[str, Depends(request_id)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "No such session",
        409: "Another turn of this session is in flight",
        413: "Message or body too large",
        415: "The body is not declared as application/json",
        422: "Body is not JSON or has fields of the wrong type",
        429: "Rate limited",
        502: "Claude failed",
        503: "Unavailable",
        504: "No first token in time",
    }.items()
}
_EVENT_STREAM = {
    "schema": {"type": "string"},
    "description": "Sent for `Accept: text/event-stream`: the AI SDK's UI message stream (v1). "
    "Events `start`, `text-start`, `text-delta`..., `text-end`, `finish`, then `data: [DONE]`; "
    "`: ping` comments while quiet; a failure is one `error` event (`errorText`, `errorType`) and "
    "no `[DONE]`. Each event's `id` is the reply's length in characters so far.",
}
_TEXT = {
    "schema": {"type": "string"},
    "description": "The reply's text as it is generated. A reply that fails midway is cut short: "
    "the connection closes without the final chunk.",
}
_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/plain": _TEXT, "text/event-stream": _EVENT_STREAM},
        "description": "The reply, streamed",
    }
}
_EVENTS: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": _EVENT_STREAM}, "description": "The reply, as events"}
}
_CHAT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ChatRequest.model_json_schema(by_alias=False)}},
    }
}

router = APIRouter()


@router.post(
    "/chat/stream",
    response_class=Response,
    responses={**_STREAM, **_ERRORS},
    openapi_extra=_CHAT_BODY,
    summary="One-shot turn, no history",
)
async def chat_stream(request: Request, chat: ChatDep, key: KeyDep, rid: RequestIdDep) -> Response:
    return await _turn(request, chat, key, rid, None)


@router.post(
    "/chat/{session_id}/stream",
    response_class=Response,
    responses={**_STREAM, **_ERRORS},
    openapi_extra=_CHAT_BODY,
    summary="One turn of a conversation; the session is created on first use",
)
async def chat_session_stream(
    session_id: SessionIdPath, request: Request, chat: ChatDep, key: KeyDep, rid: RequestIdDep
) -> Response:
    return await _turn(request, chat, key, rid, session_id)


# Read from the query string and checked by the chat service, so that a bad limit or cursor is a 400
# like every other bad parameter (FastAPI's own check would answer 422); documented here.
_PAGE_PARAMETERS = {
    "parameters": [
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "description": "Messages per page: 1 up to CHAT_HISTORY_PAGE_MAX; CHAT_HISTORY_PAGE_SIZE if omitted",
            "schema": {"type": "integer", "minimum": 1},
        },
        {
            "name": "before",
            "in": "query",
            "required": False,
            "description": "A message id, e.g. a page's `next_before`: the page just before that message",
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        },
    ]
}


@router.post(
    "/chat",
    response_class=Response,
    responses={**_EVENTS, **_ERRORS},
    openapi_extra=_CHAT_BODY,
    summary="One turn of the conversation the body's `id` names, as the AI SDK's `DefaultChatTransport` sends it",
    description="The body is the AI SDK's: `{id, messages, trigger, messageId?}`. The message is the text "
    "of the last user message in `messages` (the server keeps the history); `trigger: regenerate-message` "
    "regenerates the last reply. The reply is always an event stream.",
)
async def chat_from_body(request: Request, chat: ChatDep, key: KeyDep, rid: RequestIdDep) -> Response:
    return await _turn(request, chat, key, rid, FROM_BODY)


@router.get(
    "/chat/{session_id}/messages",
    response_model=SessionHistory,
    responses=_ERRORS,
    openapi_extra=_PAGE_PARAMETERS,
    summary="The stored history in pages: the newest page first, each page oldest first",
)
async def session_messages(
    session_id: SessionIdPath, request: Request, chat: ChatDep, caller: CallerDep
) -> Response:
    query = request.query_params
    page = await chat.history(caller.tenant, session_id, query.get("limit"), query.get("before"))
    # The stored messages are already JSON: splice them rather than decode and re-encode.
    body = b'{"session_id":%s,"messages":[%s],"next_before":%s}' % (
        orjson.dumps(session_id),
        b",".join(page.messages),
        orjson.dumps(page.next_before),
    )
    return Response(body, media_type="application/json")


@router.delete("/chat/{session_id}", status_code=204, responses=_ERRORS, summary="Forget a session")
async def delete_session(session_id: SessionIdPath, chat: ChatDep, caller: CallerDep) -> Response:
    await chat.delete(caller.tenant, session_id)
    return Response(status_code=204)


@router.post(
    "/sessions", status_code=201, response_model=NewSession, responses=_ERRORS, summary="A new session id"
)
async def new_session(chat: ChatDep, caller: CallerDep) -> Response:
    session_id = await chat.create_session(caller.tenant)
    return Response(orjson.dumps({"session_id": session_id}), status_code=201, media_type="application/json")


_USAGE_PARAMETERS = {
    "parameters": [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": description,
            "schema": {"type": "string", "format": "date"},
        }
        for name, description in (
            ("from", "The first UTC day, YYYY-MM-DD; 30 days before `to` (that day included) if omitted"),
            ("to", "The last UTC day, YYYY-MM-DD, included; today if omitted"),
        )
    ]
}


@router.get(
    "/usage",
    response_model=Usage,
    responses={status: _ERRORS[status] for status in (400, 401, 503)},
    openapi_extra=_USAGE_PARAMETERS,
    summary="The calling key's usage per UTC day and model; at most CHAT_USAGE_RETENTION_DAYS days",
)
async def usage(request: Request, chat: ChatDep, caller: CallerDep) -> Response:
    query = request.query_params
    report = await chat.usage(caller.subject, query.get("from"), query.get("to"))
    body = {
        "key": caller.key,  # the key's name (None on an open API): never the key or its digest
        "from": report.first.isoformat(),
        "to": report.last.isoformat(),
        "usage": [{"day": row.day.isoformat(), "model": row.model, **row.counts} for row in report.days],
        "total": report.totals(),
    }
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorBody}}, summary="Readiness")
async def readyz(state: StateDep) -> Response:
    if state.draining:
        raise Unavailable("this worker is shutting down", retry_after=1)
    try:
        async with asyncio.timeout(1.0):
            await state.redis.ping()
    except Exception as exc:
        raise Unavailable("Redis does not answer", retry_after=1) from exc
    return Response(b'{"status":"ready"}', media_type="application/json")


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(state: StateDep) -> Response:
    # With several processes this reads their shared files: off the event loop.
    body = await asyncio.to_thread(state.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)


async def serve_turn(scope: Scope, receive: Receive, send: Send, rid: str, session_id: str | None) -> None:
    """A chat POST as plain ASGI (see `api.http.app.ChatAPI`): what the two routes below do, and what
    FastAPI's exception handlers would do for a failure before the response starts."""
    request = Request(scope, receive)
    started = False

    async def tracked(message: Message) -> None:
        nonlocal started
        started = True
        await send(message)

    try:
        response = await _turn(request, app_state(request).chat, key_of(request), rid, session_id or None)
        await response(scope, receive, tracked)
    except StreamAborted:
        raise  # the server must see it, to drop the connection without the final chunk
    except Exception as exc:
        if started:
            raise
        log.error("unhandled error in POST %s", scope["path"], exc_info=exc)
        await json_error(ChatError("the server failed; try again"), rid)(scope, receive, send)


def key_of(request: Request) -> str | None:
    """The API key as `presented_key` reads it: `Authorization: Bearer`, else `X-API-Key`."""
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials:
            return credentials
    return request.headers.get("x-api-key")


async def _turn(
    request: Request, chat: ChatService, key: str | None, rid: str, session_id: str | None
) -> Response:
    from_body = session_id == FROM_BODY
    if from_body:
        session_id = None
    # The turn's log line names its session only once the id has passed the check.
    report = TurnReport(request_id=rid)
    chat.start(report)
    who: Caller | None = None
    try:
        if app_state(request).draining:
            raise Unavailable("this worker is shutting down; retry and another will serve you", retry_after=1)
        check_media_type(request.headers.get("content-type"))
        who = identify(request, key)
        report.tenant, report.key = who.tenant, who.key
        if session_id is not None:
            report.session_id = check_session_id(session_id)
        idempotency = idempotency_key(request)
        body = await read_chat_body(request, chat.settings.max_body_bytes)
        if from_body:
            if body.id is None or not SESSION_ID.fullmatch(body.id):
                raise InvalidRequest(
                    "id must be the session id: 1-128 characters of A-Z, a-z, 0-9, '_' or '-'"
                )
            session_id = report.session_id = body.id
    except ChatError as exc:
        report.outcome, report.status, report.error_type, report.detail = (
            exc.outcome,
            exc.status,
            exc.type,
            exc.message,
        )
        quota = await chat.quota(who.subject, who.limits) if who is not None else None
        await chat.finish(report)
        return json_error(exc, rid, quota.headers() if quota is not None else ())
    except ClientDisconnect:
        # The client left while sending its body: nobody reads this response, but the request
        # still ends with exactly one outcome (and stops counting as in flight).
        report.outcome, report.status = Outcome.CLIENT_DISCONNECTED_BEFORE_STREAMING, 499
        await chat.finish(report)
        return Response(status_code=499)
    except BaseException as exc:
        report.outcome, report.detail = Outcome.UNKNOWN_ERROR, f"{type(exc).__name__}: {exc}"
        report.status = 500
        await chat.finish(report)
        raise
    headers = [(b"x-request-id", rid.encode())]
    if session_id is not None:
        headers.append((b"x-session-id", session_id.encode()))
    turn = TurnRequest(who.tenant, session_id, body, who.subject, who.limits, idempotency_key=idempotency)
    if from_body or wants_events(request.headers.get("accept")):
        turn.protocol = "sse"
        return EventStreamResponse(chat, turn, report, headers)
    return TurnResponse(chat, turn, report, headers)


def check_media_type(content_type: str | None) -> None:
    """A chat body must be declared JSON. That also stops a cross-site page from starting turns with
    a `text/plain` POST, which a browser sends without asking the server first."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType("a chat request's Content-Type must be application/json")


async def read_chat_body(request: Request, limit: int) -> ChatRequest:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"the body is over {limit} bytes")
    size = 0
    parts: list[bytes] = []
    # Counting as the body arrives refuses an oversized chunked body before it is read whole.
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise RequestTooLarge(f"the body is over {limit} bytes")
        parts.append(part)
    raw = b"".join(parts)
    try:
        return ChatRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise ValidationFailed(describe_validation(exc)) from None


def describe_validation(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors()[:3]:
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "json_invalid":
            problems.append("the body is not valid JSON")
        elif error["type"] == "model_type":
            problems.append("the body must be a JSON object")
        else:
            problems.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(problems)


def json_error(error: ChatError, rid: str | None, extra: Iterable[tuple[bytes, bytes]] = ()) -> Response:
    response = error_response(error.status, error.type, error.message, rid, error.retry_after)
    response.raw_headers.extend(error_headers(error))
    response.raw_headers.extend(extra)
    return response


def error_headers(error: ChatError) -> list[tuple[bytes, bytes]]:
    if isinstance(error, AuthenticationFailed):
        return [(b"www-authenticate", b"Bearer")]
    return []


def error_response(
    status: int, type_: str, message: str, rid: str | None, retry_after: float | None = None
) -> Response:
    headers = {"x-request-id": rid} if rid else {}
    if retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    return Response(error_body(type_, message), status, headers, "application/json")
