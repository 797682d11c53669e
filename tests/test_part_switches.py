"""Each hand-written part has a setting that puts back the library it replaces (the bench's ablation
arms run on them, and they are a way out should a part misbehave): each must do what it says."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest

import api.http.app
from api.config import Settings
from api.http.protocol import ChatHttpProtocol, JsonErrorProtocol
from api.http.server import uvicorn_options
from api.main import create_app
from api.outcomes import Outcome, TurnReport
from api.upstream.client import Upstream, UpstreamRequest
from api.upstream.transport import LeanTransport
from tests.conftest import asgi_client

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
