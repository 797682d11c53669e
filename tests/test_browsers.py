"""What browsers and embedders meet: CORS on every route, 415 for a body not declared JSON, and chat
POSTs that pass through the app's middleware like every other request. On a real socket."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from typing import Any, ClassVar

import httpx
import pytest
from starlette.middleware.gzip import GZipMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.config import Settings
from api.dev.standin import StandInModel
from api.http.app import CORS_EXPOSED_HEADERS, CORS_REQUEST_HEADERS
from api.http.protocol import ChatHttpProtocol
from api.main import create_app
from api.outcomes import TurnReport
from tests.conftest import LiveApp
from tests.processes import ThreadServer, free_port

StartApp = Callable[..., LiveApp]
ORIGIN = "https://app.example"


def routes(app: Any) -> list[tuple[str, str]]:
    """Every route the app declares (its API's from the OpenAPI schema, and the schema's and docs' own
    routes), as (method, path) with the path's parameters filled in."""
    found = [
        (method.upper(), path.replace("{session_id}", "s1"))
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    ]
    for route in app.routes:
        if isinstance(route, Route):
            found += [(method, route.path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return found


def request(live: LiveApp, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    body = {"message": "hi"} if method == "POST" and path.startswith("/chat") else None
    return live.client.request(method, path, json=body, headers=headers)


def test_every_route_answers_a_preflight_and_exposes_its_headers(live_app: StartApp) -> None:
    live = live_app(cors_origins=f"{ORIGIN}, https://other.example")
    checked = routes(live.server.server.config.app)
    assert ("POST", "/chat/s1/stream") in checked and ("DELETE", "/chat/s1") in checked
    assert ("POST", "/chat") in checked and ("GET", "/metrics") in checked
    for method, path in checked:
        preflight = live.client.options(
            path,
            headers={
                "origin": ORIGIN,
                "access-control-request-method": method,
                "access-control-request-headers": ", ".join(CORS_REQUEST_HEADERS),
            },
        )
        assert preflight.status_code == 200, (method, path, preflight.text)
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert {"GET", "POST", "DELETE"} <= set(preflight.headers["access-control-allow-methods"].split(", "))
        allowed = set(preflight.headers["access-control-allow-headers"].lower().split(", "))
        assert set(CORS_REQUEST_HEADERS) <= allowed, (method, path)

        response = request(live, method, path, {"origin": ORIGIN})
        assert response.status_code < 500, (method, path, response.text)
        assert response.headers["access-control-allow-origin"] == ORIGIN, (method, path)
        exposed = response.headers["access-control-expose-headers"].lower().split(", ")
        assert sorted(exposed) == sorted(name.lower() for name in CORS_EXPOSED_HEADERS), (method, path)


def test_an_origin_not_listed_gets_no_cors_headers(live_app: StartApp) -> None:
    live = live_app(cors_origins=ORIGIN)
    preflight = live.client.options(
        "/chat/s1/stream",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers
    response = live.client.post(
        "/chat/s1/stream", json={"message": "hi"}, headers={"origin": "https://evil.example"}
    )
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_a_star_allows_any_origin(live_app: StartApp) -> None:
    live = live_app(cors_origins="*")
    response = live.client.post("/chat/s1/stream", json={"message": "hi"}, headers={"origin": ORIGIN})
    assert response.text == "echo: hi [turns=1]"
    assert response.headers["access-control-allow-origin"] == "*"


def test_without_cors_origins_there_is_no_cors(live_app: StartApp) -> None:
    live = live_app()
    preflight = live.client.options(
        "/chat/s1/stream", headers={"origin": ORIGIN, "access-control-request-method": "POST"}
    )
    assert preflight.status_code == 405
    assert not [name for name in preflight.headers if name.startswith("access-control-")]


def test_cors_origins_must_be_origins(make_settings: Callable[..., Settings]) -> None:
    from pydantic import ValidationError

    for bad in ("app.example", "https://app.example/", "https://app.example/path", "ftp://app.example"):
        with pytest.raises(ValidationError):
            make_settings(cors_origins=bad)
    assert make_settings(cors_origins="*, http://localhost:5173").cors_origins == [
        "*",
        "http://localhost:5173",
    ]


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded"]
)
def test_a_chat_body_not_declared_json_is_415_and_nothing_runs(
    make_settings: Callable[..., Settings], standin: StandInModel, content_type: str | None
) -> None:
    # Redis is a closed port: a request that touched it would be a 503, not a 415. A short Redis
    # timeout, for start-up waits that long for a Redis it cannot reach.
    reports: list[TurnReport] = []
    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_seconds=0.5)
    app = create_app(settings, on_turn_end=reports.append)
    asked = len(standin.requests)
    headers = {"content-type": content_type} if content_type is not None else {}
    with ThreadServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        for path in ("/chat/s1/stream", "/chat/stream", "/chat"):
            response = client.post(path, content=b'{"message": "hi"}', headers=headers)
            assert response.status_code == 415, response.text
            assert response.json()["error"]["type"] == "unsupported_media_type"
            assert response.headers["content-type"] == "application/json"
    assert len(standin.requests) == asked
    assert [r.status for r in reports] == [415, 415, 415]


def test_json_with_parameters_is_json(live_app: StartApp) -> None:
    live = live_app()
    response = live.client.post(
        "/chat/s1/stream",
        content=b'{"message": "hi"}',
        headers={"content-type": "Application/JSON; charset=utf-8"},
    )
    assert response.status_code == 200 and response.text == "echo: hi [turns=1]"


class Recorder:
    """An embedder's own pure-ASGI middleware: it notes every request and response status it sees."""

    seen: ClassVar[list[tuple[str, str, int]]] = []

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def noted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.seen.append((scope["method"], scope["path"], message["status"]))
                message["headers"] = [*message.get("headers", []), (b"x-embedder", b"1")]
            await send(message)

        await self.app(scope, receive, noted)


@pytest.mark.parametrize("http", ["production", "httptools"])
def test_an_embedders_middleware_sees_chat_posts(make_settings: Callable[..., Settings], http: str) -> None:
    Recorder.seen = []
    app = create_app(make_settings())
    app.add_middleware(Recorder)
    protocol = ChatHttpProtocol if http == "production" else "httptools"
    with ThreadServer(app, protocol) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        reply = client.post("/chat/s1/stream", json={"message": "hi"})
        events = client.post(
            "/chat",
            json={"id": "s2", "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]},
        )
        busy = client.post("/chat/s1/stream", json={"message": ""})
        client.get("/healthz")
    assert reply.text == "echo: hi [turns=1]" and reply.headers["x-embedder"] == "1"
    assert events.headers["x-embedder"] == "1" and "[DONE]" in events.text
    assert busy.status_code == 400 and busy.headers["x-embedder"] == "1"
    assert Recorder.seen == [
        ("POST", "/chat/s1/stream", 200),
        ("POST", "/chat", 200),
        ("POST", "/chat/s1/stream", 400),
        ("GET", "/healthz", 200),
    ]


def test_a_middleware_that_rewrites_bodies_gets_every_chunk(make_settings: Callable[..., Settings]) -> None:
    # A reply's chunks go around only middleware known to look at nothing but the response's start.
    app = create_app(make_settings())
    app.add_middleware(GZipMiddleware, minimum_size=1)
    body = {"message": "@@deltas=5 @@delay=0.01"}
    with (
        ThreadServer(app) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
        client.stream("POST", "/chat/s1/stream", json=body, headers={"accept-encoding": "gzip"}) as response,
    ):
        assert response.headers["content-encoding"] == "gzip"
        raw = b"".join(response.iter_raw())
    assert gzip.decompress(raw) == b"w0 w1 w2 w3 w4 "
