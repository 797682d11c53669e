"""Each hand-written part has a setting that puts back the library it replaces (the bench's ablation
arms run on them, and they are a way out should a part misbehave): each must do what it says."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

import anthropic
import fakeredis
import pytest

import api.http.app
from api.config import Settings
from api.dev.standin import RecordedRequest, StandInModel
from api.errors import ChatError
from api.http.protocol import ChatHttpProtocol, JsonErrorProtocol
from api.http.server import uvicorn_options
from api.main import create_app
from api.outcomes import Outcome, TurnReport
from api.store.multiplex import SharedConnection
from api.upstream.client import Upstream, UpstreamRequest
from api.upstream.transport import LeanTransport
from tests.conftest import LiveApp, asgi_client
from tests.test_upstream_conformance import turn
from tests.topologies import suite_mode

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("transport", "lean"), [("lean", True), ("httpx", False)])
async def test_the_upstream_transport_setting_picks_the_transport(
    make_settings: Callable[..., Settings], transport: str, lean: bool
) -> None:
    upstream = Upstream(make_settings(upstream_transport=transport))
    try:
        assert isinstance(upstream.client._client._transport, LeanTransport) is lean
        request = UpstreamRequest(model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
        reply = await upstream.open(request)
        try:
            # Only the lean transport pushes a body from its connection's callback.
            texts: list[bytes] = []
            ended = asyncio.get_running_loop().create_future()
            assert reply.pipe(texts.append, ended.set_result) is lean
            if lean:
                assert await ended is None
            else:
                texts = [text async for text in reply.chunks()]
        finally:
            await reply.close()
        assert b"".join(texts) == b"echo: hi [turns=1]"
    finally:
        await upstream.aclose()


@pytest.mark.parametrize(
    ("protocol", "expected"), [("chat", ChatHttpProtocol), ("httptools", JsonErrorProtocol)]
)
def test_the_http_protocol_setting_picks_the_server_protocol(
    make_settings: Callable[..., Settings], protocol: str, expected: Any
) -> None:
    assert uvicorn_options(make_settings(http_protocol=protocol))["http"] == expected


@pytest.mark.parametrize("fast_path", [True, False])
async def test_without_the_fast_path_a_turn_goes_through_fastapi(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, fast_path: bool
) -> None:
    direct: list[str] = []
    served = api.http.app.serve_turn

    async def spy(*args: Any) -> None:
        direct.append("fast path")
        await served(*args)

    monkeypatch.setattr(api.http.app, "serve_turn", spy)
    reports: list[TurnReport] = []
    redis = fakeredis.FakeAsyncRedis()
    app = create_app(make_settings(fast_path=fast_path), on_turn_end=reports.append, redis=redis)
    try:
        async with asgi_client(app) as http:
            response = await http.post("/chat/s1/stream", json={"message": "@@deltas=3"})
    finally:
        await redis.aclose()
    assert response.status_code == 200 and response.text == "w0 w1 w2 "
    assert response.headers["x-request-id"]
    assert reports[0].outcome is Outcome.SUCCESS
    assert direct == (["fast path"] if fast_path else [])


def _message_of(request: RecordedRequest) -> str | None:
    messages = (request.body or {}).get("messages") or [{}]
    content = messages[-1].get("content")
    if isinstance(content, list) and content:  # marked for the prompt cache: one text block
        content = content[0].get("text")
    return content if isinstance(content, str) else None


@pytest.mark.parametrize(("client", "direct"), [("direct", True), ("sdk", False)])
async def test_the_upstream_client_setting_picks_who_builds_the_request(
    make_settings: Callable[..., Settings], standin: StandInModel, client: str, direct: bool
) -> None:
    """Whoever builds it, the request Claude gets is the same: the SDK's headers (auth, version,
    user agent, platform, timeouts, retry count) and the same JSON body."""
    upstream = Upstream(make_settings(upstream_client=client))
    try:
        assert (upstream.direct is not None) is direct
        mark = f"which {client}"
        assert await turn(upstream, mark) == f"echo: {mark} [turns=1]".encode()
    finally:
        await upstream.aclose()
    sent = next(r for r in reversed(standin.requests) if _message_of(r) == mark)
    sdk = anthropic.AsyncAnthropic(api_key="test-key", base_url=standin.url)
    expected = {name.lower(): value for name, value in sdk.default_headers.items() if isinstance(value, str)}
    for name, value in expected.items():
        assert sent.headers.get(name) == value, name
    assert sent.headers["x-stainless-retry-count"] == "0"
    assert sent.headers["x-stainless-read-timeout"] == "5.0"
    assert sent.headers["accept-encoding"] == "identity"
    assert sent.path == "/v1/messages"
    assert sent.body == {
        "model": "m",
        "max_tokens": 16,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": mark, "cache_control": {"type": "ephemeral"}}],
            }
        ],
        "stream": True,
    }


async def test_the_direct_path_gives_way_where_the_sdk_must_build_each_request(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy (only httpx's transport speaks to one) or the SDK's own tracing keep the SDK's path."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    upstream = Upstream(make_settings())
    assert upstream.direct is None
    await upstream.aclose()
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "chat")
    upstream = Upstream(make_settings())
    assert upstream.direct is None
    await upstream.aclose()


@pytest.mark.parametrize("client", ["direct", "sdk"])
@pytest.mark.parametrize(
    ("directives", "status", "attempts"),
    [
        # Retried as the SDK retries: a 529 twice, then the reply.
        ("@@status=529 @@fail_attempts=2", None, 3),
        # The server says not to retry: one attempt, and the status as the SDK maps it.
        ("@@status=500 @@should_retry=false", 502, 1),
        # A 4xx other than 408, 409 and 429 is not retried.
        ("@@status=400", 502, 1),
        # Retries run out: 2 retries, then the 429 with its Retry-After.
        ("@@status=429 @@retry_after=0.01", 503, 3),
    ],
)
async def test_both_paths_retry_and_fail_alike(
    make_settings: Callable[..., Settings],
    standin: StandInModel,
    client: str,
    directives: str,
    status: int | None,
    attempts: int,
) -> None:
    upstream = Upstream(make_settings(upstream_client=client, upstream_max_retries=2))
    mark = f"{client} {directives} {secrets.token_hex(4)}"
    try:
        if status is None:
            assert (await turn(upstream, mark)).startswith(b"echo:")
        else:
            with pytest.raises(ChatError) as raised:
                await turn(upstream, mark)
            assert raised.value.status == status
    finally:
        await upstream.aclose()
    sent = [r for r in standin.requests if _message_of(r) == mark]
    assert [r.headers["x-stainless-retry-count"] for r in sent] == [str(n) for n in range(attempts)]


@pytest.mark.parametrize("shared", [True, False])
def test_the_shared_connection_setting_picks_how_a_turns_calls_reach_redis(
    live_app: Callable[..., LiveApp], monkeypatch: pytest.MonkeyPatch, shared: bool
) -> None:
    if suite_mode() != "single":
        pytest.skip("a shared connection is for one Redis")
    sent: list[Any] = []
    call = SharedConnection.call

    async def counted(self: SharedConnection, *args: Any) -> Any:
        sent.append(args[0])
        return await call(self, *args)

    monkeypatch.setattr(SharedConnection, "call", counted)
    app = live_app(redis_shared_connection=shared, rate_limit_requests=100)
    assert app.chat("shared", "one").text == "echo: one [turns=1]"
    assert app.chat("shared", "two").text == "echo: two [turns=2]"
    # Two turns: admission with the lock, and the commit with its settlement, each one script.
    assert sent == (["EVALSHA"] * 4 if shared else [])
    assert [m["content"] for m in app.history("shared")] == [
        "one",
        "echo: one [turns=1]",
        "two",
        "echo: two [turns=2]",
    ]
