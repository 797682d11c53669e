"""The ASGI application: `create_app(settings)` builds it; the lifespan makes its clients."""

from __future__ import annotations

import gc
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.config import Settings
from api.errors import ChatError, StreamAborted, ValidationFailed
from api.http.auth import Authenticator
from api.http.keys_file import KeysFile
from api.http.protocol import CLIENT_WRITER
from api.http.resume import router as resume_router
from api.http.routes import FROM_BODY, error_response, json_error, router, serve_turn
from api.http.state import AppState
from api.http.streaming import RAW_SEND
from api.http.web import web_router
from api.keyring import env_keys
from api.ops.drain import Drain
from api.ops.logs import REQUEST_ID, quiet_aborted_streams
from api.ops.metrics import Metrics
from api.outcomes import OutcomeRecorder, TurnHook
from api.store.admission import Admission, Limits
from api.store.history import SessionStore
from api.store.multiplex import SharedConnection
from api.store.redis import Client, TimedRedis, close, make_redis, prepare
from api.store.scripts import Bundle, Scripts
from api.turn.service import ChatService
from api.turn.slots import GenerationSlots
from api.upstream.client import Upstream

log = logging.getLogger("api")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}

CORS_METHODS = ["GET", "POST", "DELETE"]
CORS_REQUEST_HEADERS = [
    "content-type",
    "authorization",
    "x-api-key",
    "x-request-id",
    "idempotency-key",
    "last-event-id",
]
CORS_EXPOSED_HEADERS = [
    "X-Session-Id",
    "X-Request-Id",
    "Retry-After",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "Idempotent-Replayed",
]


def create_app(
    settings: Settings | None = None,
    *,
    on_turn_end: TurnHook | None = None,
    redis: Client | None = None,
    own_process: bool = False,
) -> FastAPI:
    """Build the app. `redis` lets a test hand in its own client (which it then closes itself).

    `own_process` is for the app a server process runs as its own, not for one embedded in a bigger
    application or a test: SIGTERM drains the worker (api/ops/drain.py), and what start-up built is
    moved out of the garbage collector's sight (`settle_heap`).
    """
    settings = settings or Settings()
    recorder = OutcomeRecorder(on_turn_end)
    keys = env_keys(key.get_secret_value() for key in settings.api_keys)
    keys_file = KeysFile(settings.api_keys_file, keys) if settings.api_keys_file is not None else None
    if keys_file is not None:
        keys = keys_file.load()
    auth = Authenticator(
        keys, settings.trusted_proxies, defaults=Limits.defaults(settings), closed=keys_file is not None
    )
    metrics = Metrics()
    metrics.watch(recorder)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        quiet_aborted_streams()
        client = redis or make_redis(settings)
        if redis is None:
            await prepare(client, [*Scripts.sources(), Bundle.source()], settings.redis_timeout_seconds)
        scripts = Scripts.register(client)
        shared = (
            SharedConnection(client, settings.redis_timeout_seconds)
            if settings.redis_shared_connection
            and isinstance(client, TimedRedis)
            and settings.redis_mode == "single"
            else None
        )
        store = SessionStore(
            client,
            scripts,
            ttl_seconds=settings.session_ttl_seconds,
            max_messages=settings.history_max_messages,
            lock_ttl=settings.lock_ttl_seconds,
            on_error=metrics.redis_error,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout=settings.redis_timeout_seconds,
            shared=shared,
        )
        upstream = Upstream(settings)
        admission = Admission(client, scripts, settings, on_error=metrics.redis_error)
        slots = (
            GenerationSlots(settings.worker_max_streams, settings.worker_queue_seconds)
            if settings.worker_max_streams
            else None
        )
        chat = ChatService(settings, store, upstream, recorder, admission, slots)
        await chat.start_listening()
        if keys_file is not None:
            keys_file.follow(auth)
        state = AppState(settings, client, chat, auth, metrics)
        app.state.current = state
        drain = Drain(state, recorder, settings.drain_seconds)
        if own_process:
            drain.install()
            settle_heap()
        try:
            yield {"app": state}
        finally:
            drain.uninstall()
            if keys_file is not None:
                await keys_file.aclose()
            await chat.stop_listening()
            await chat.renewer.aclose()
            await upstream.aclose()
            if shared is not None:
                await shared.aclose()
            if redis is None:
                await close(client)
            metrics.close()

    app = ChatAPI(
        title="redis-chat-api",
        version="0.1.0",
        summary="Streams Claude's replies as plain text; conversations live in Redis.",
        lifespan=lifespan,
    )
    app.fast_path = settings.fast_path
    app.state.recorder = recorder
    app.include_router(router)
    if settings.web_ui:
        app.include_router(web_router())
    app.include_router(resume_router)
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins:
        # Outermost, so that a preflight is answered before anything else runs.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
        )

    @app.exception_handler(ChatError)
    async def chat_error(request: Request, exc: ChatError) -> Response:
        return json_error(exc, _rid(request))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return json_error(ValidationFailed("the request is malformed"), _rid(request))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        type_ = _HTTP_TYPES.get(exc.status_code, "http_error")
        response = error_response(exc.status_code, type_, str(exc.detail), _rid(request))
        if exc.headers:
            response.headers.update(exc.headers)
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; a path served by two
            # routes (POST and GET /chat/{id}/stream) allows the methods of both.
            response.headers["allow"] = ", ".join(allowed_methods(request))
        return response

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        # A reply cut on purpose reaches here too (the server must see it to drop the connection);
        # its turn has logged its own outcome, and it is no crash.
        if not isinstance(exc, StreamAborted):
            log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return json_error(ChatError("the server failed; try again"), _rid(request))

    return app


class ChatAPI(FastAPI):
    """FastAPI, with chat POSTs served by a lean dispatcher that sits where the router would.

    A turn is the one request a deployment serves hundreds of times a second, and FastAPI's routing
    and dependency solving cost about as much as the rest of a turn together. So `ChatDispatch` is
    the innermost of the middleware (the app's own, CORS, and any an embedder adds): they all see
    every chat POST, which then runs the same handler as the routes (`api.http.routes.serve_turn`)
    without the router. The routes stay declared, for the OpenAPI schema.

    A reply's chunks may skip the middleware's `send` wrappers (`RAW_SEND`, `CLIENT_WRITER`): only
    while every middleware is one known to look at nothing but a response's start.
    """

    _direct = True
    # CHAT_FAST_PATH=false: chat POSTs go through FastAPI's routing too (the bench's ablation arm).
    fast_path = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._direct:
            scope.pop(CLIENT_WRITER, None)
        elif self.fast_path:
            scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)

    def build_middleware_stack(self) -> ASGIApp:
        own = self.user_middleware
        self._direct = all(entry.cls in START_ONLY for entry in own)
        if not self.fast_path:
            return super().build_middleware_stack()
        # Innermost of the user's middleware, inside everything an embedder added.
        self.user_middleware = [*own, Middleware(ChatDispatch)]
        try:
            return super().build_middleware_stack()
        finally:
            self.user_middleware = own


class ChatDispatch:
    """Serves a chat POST straight away; hands everything else on to the rest of the stack."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and "app" in scope.get("state", ()):
            session_id = chat_path(scope["path"])
            if session_id is not None:
                rid = scope.get("state", {}).get("request_id") or assign_request_id(scope)
                await serve_turn(scope, receive, send, rid, session_id)
                return
        await self.app(scope, receive, send)


def chat_path(path: str) -> str | None:
    """ "" for the one-shot route, FROM_BODY for `POST /chat`, the session id for a session's route,
    None for anything else."""
    if path == "/chat/stream":
        return ""
    if path == "/chat":
        return FROM_BODY
    if path.startswith("/chat/") and path.endswith("/stream"):
        session_id = path[6:-7]
        if session_id and "/" not in session_id:
            return session_id
    return None


def assign_request_id(scope: Scope) -> str:
    """The client's request id when it sent a sane one, else a new one; kept in the scope's state."""
    rid = None
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            rid = candidate if _REQUEST_ID.fullmatch(candidate) else None
            break
    rid = rid or uuid.uuid4().hex
    scope.setdefault("state", {})["request_id"] = rid
    return rid


def allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def _rid(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


class RequestIdMiddleware:
    """Gives every request an id (the client's, when it sent a sane one) and echoes it on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = assign_request_id(scope)
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                if not any(name == b"x-request-id" for name, _ in headers):
                    message["headers"] = [*headers, header]
            await send(message)

        token = REQUEST_ID.set(rid)  # every log line written for this request carries its id
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


# Middleware that only reads or adds to a response's start: a reply's chunks may go around them.
START_ONLY: frozenset[Any] = frozenset({RequestIdMiddleware, CORSMiddleware})


def settle_heap() -> None:
    """Freeze what start-up allocated (the SDK, pydantic's schemas, FastAPI's routes: most of the
    heap, and all of it long-lived) so that the collector stops walking it again and again on every
    older-generation pass. It is about a tenth of a worker's CPU per stream under load."""
    gc.collect()
    gc.freeze()
