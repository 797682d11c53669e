"""Request validation, the error shape and request ids, through the ASGI app (fakeredis, stand-in model)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import httpx
import pytest

from api.config import Settings
from api.main import create_app
from api.outcomes import Outcome, TurnReport
from tests.conftest import asgi_client

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[tuple[httpx.AsyncClient, list[TurnReport]]]:
    reports: list[TurnReport] = []
    redis = fakeredis.FakeAsyncRedis()
    settings = make_settings(
        max_message_chars=100, max_body_bytes=2048, allowed_models="m-1,m-2", model="m-1"
    )
    app = create_app(settings, on_turn_end=reports.append, redis=redis)
    async with asgi_client(app) as http:
        yield http, reports
    await redis.aclose()


def assert_error(response: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == type_
    assert body["error"]["message"]
    assert response.headers["x-request-id"]
    return body


async def test_a_turn_streams_plain_text(client: tuple[httpx.AsyncClient, list[TurnReport]]) -> None:
    http, reports = client
    response = await http.post("/chat/s1/stream", json={"message": "hi there"})
    assert response.status_code == 200
    assert response.text == "echo: hi there [turns=1]"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-session-id"] == "s1"
    assert [r.outcome for r in reports] == [Outcome.SUCCESS]


async def test_user_input_is_an_alias_of_message(client: tuple[httpx.AsyncClient, list[TurnReport]]) -> None:
    http, _ = client
    response = await http.post("/chat/stream", json={"user_input": "aliased"})
    assert response.text == "echo: aliased [turns=1]"


@pytest.mark.parametrize(
    ("path", "body", "status", "type_"),
    [
        ("/chat/stream", {"message": ""}, 400, "invalid_request"),
        ("/chat/stream", {"message": " \n\t "}, 400, "invalid_request"),
        ("/chat/stream", {}, 400, "invalid_request"),
        ("/chat/bad%20id/stream", {"message": "x"}, 400, "invalid_request"),
        ("/chat/" + "a" * 129 + "/stream", {"message": "x"}, 400, "invalid_request"),
        ("/chat/stream", {"message": "x", "model": "m-3"}, 400, "invalid_request"),
        ("/chat/stream", {"message": "x", "max_tokens": 0}, 400, "invalid_request"),
        ("/chat/stream", {"message": "x", "max_tokens": 10**6}, 400, "invalid_request"),
        ("/chat/stream", {"message": "x", "temperature": 1.5}, 400, "invalid_request"),
        ("/chat/stream", {"message": "x", "temperature": -0.1}, 400, "invalid_request"),
        ("/chat/stream", {"regenerate": True}, 400, "invalid_request"),
        ("/chat/s2/stream", {"regenerate": True}, 400, "invalid_request"),
        ("/chat/s2/stream", {"regenerate": True, "message": "x"}, 400, "invalid_request"),
        ("/chat/stream", {"message": "x" * 101}, 413, "request_too_large"),
        ("/chat/stream", {"message": "x", "system": "s" * 101}, 413, "request_too_large"),
        ("/chat/stream", {"message": 42}, 422, "validation_error"),
        ("/chat/stream", {"message": "x", "max_tokens": "10"}, 422, "validation_error"),
        ("/chat/stream", {"message": "x", "regenerate": "yes"}, 422, "validation_error"),
        ("/chat/stream", ["message"], 422, "validation_error"),
    ],
)
async def test_bad_requests_get_the_documented_status(
    client: tuple[httpx.AsyncClient, list[TurnReport]], path: str, body: Any, status: int, type_: str
) -> None:
    http, reports = client
    assert_error(await http.post(path, json=body), status, type_)
    assert [(r.outcome, r.status) for r in reports] == [(Outcome.REJECTED, status)]


JSON_BODY = {"content-type": "application/json"}


async def test_a_body_that_is_not_json_is_422(client: tuple[httpx.AsyncClient, list[TurnReport]]) -> None:
    http, _ = client
    body = assert_error(
        await http.post("/chat/stream", content=b"{not json", headers=JSON_BODY), 422, "validation_error"
    )
    assert "JSON" in body["error"]["message"]


async def test_an_oversized_body_is_413_with_or_without_a_length(
    client: tuple[httpx.AsyncClient, list[TurnReport]],
) -> None:
    http, _ = client
    big = b'{"message": "' + b"x" * 4000 + b'"}'
    assert_error(await http.post("/chat/stream", content=big, headers=JSON_BODY), 413, "request_too_large")

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    assert_error(
        await http.post("/chat/stream", content=chunked(), headers=JSON_BODY), 413, "request_too_large"
    )


async def test_unknown_paths_and_methods_use_the_error_shape(
    client: tuple[httpx.AsyncClient, list[TurnReport]],
) -> None:
    http, _ = client
    assert_error(await http.get("/nowhere"), 404, "not_found")
    assert_error(await http.get("/chat/stream"), 405, "method_not_allowed")


async def test_request_ids_are_echoed_or_generated(
    client: tuple[httpx.AsyncClient, list[TurnReport]],
) -> None:
    http, reports = client
    response = await http.post("/chat/stream", json={"message": "x"}, headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert reports[-1].request_id == "abc-123"
    generated = await http.get("/healthz")
    assert len(generated.headers["x-request-id"]) >= 16
    # An id that could forge log lines is replaced, not echoed.
    hostile = await http.get("/healthz", headers={"x-request-id": "a b\tc"})
    assert hostile.headers["x-request-id"] != "a b\tc"
    error = await http.post("/chat/stream", json={"message": ""}, headers={"x-request-id": "err-1"})
    assert error.headers["x-request-id"] == "err-1"


async def test_sessions_read_delete_and_create(client: tuple[httpx.AsyncClient, list[TurnReport]]) -> None:
    http, _ = client
    assert_error(await http.get("/chat/nope/messages"), 404, "not_found")
    assert_error(await http.delete("/chat/nope"), 404, "not_found")
    assert_error(await http.get("/chat/bad!id/messages"), 400, "invalid_request")

    created = await http.post("/sessions")
    assert created.status_code == 201
    session_id = created.json()["session_id"]
    assert len(session_id) >= 22  # at least 128 bits, URL-safe
    assert (await http.get(f"/chat/{session_id}/messages")).json() == {
        "session_id": session_id,
        "messages": [],
        "next_before": None,
    }

    await http.post(f"/chat/{session_id}/stream", json={"message": "first"})
    history = (await http.get(f"/chat/{session_id}/messages")).json()["messages"]
    assert [(m["role"], m["content"]) for m in history] == [
        ("user", "first"),
        ("assistant", "echo: first [turns=1]"),
    ]
    assert all({"id", "created_at"} <= set(m) for m in history)
    assert (await http.delete(f"/chat/{session_id}")).status_code == 204
    assert_error(await http.get(f"/chat/{session_id}/messages"), 404, "not_found")


async def test_health_endpoints(client: tuple[httpx.AsyncClient, list[TurnReport]]) -> None:
    http, _ = client
    assert (await http.get("/healthz")).status_code == 200
    assert (await http.get("/readyz")).status_code == 200


async def test_readiness_is_503_when_redis_is_unreachable(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.5))
    async with asgi_client(app) as http:
        response = await http.get("/readyz")
        assert_error(response, 503, "unavailable")
        assert response.headers["retry-after"]
        chat = await http.post("/chat/s/stream", json={"message": "x"})
        assert_error(chat, 503, "unavailable")
        assert chat.headers["retry-after"]


async def test_only_an_app_run_as_its_own_process_freezes_its_start_up_heap(
    make_settings: Callable[..., Settings],
) -> None:
    redis = fakeredis.FakeAsyncRedis()
    gc.unfreeze()
    try:
        async with asgi_client(create_app(make_settings(), redis=redis)):
            assert gc.get_freeze_count() == 0  # embedded in a test (or a bigger app): left alone
        async with asgi_client(create_app(make_settings(), redis=redis, own_process=True)):
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        await redis.aclose()
