"""Replies as Server-Sent Events in the AI SDK's UI message stream protocol, and `POST /chat` with the
AI SDK's body. On a real socket, under the production protocol (the reply pushed) and plain httptools
(the reply pulled)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from api.http.protocol import ChatHttpProtocol
from tests.conftest import LiveApp

StartApp = Callable[..., LiveApp]
SSE = {"accept": "text/event-stream"}


@pytest.fixture(params=["production", "httptools"])
def start(request: pytest.FixtureRequest, live_app: StartApp) -> StartApp:
    protocol = ChatHttpProtocol if request.param == "production" else "httptools"

    def make(**settings: Any) -> LiveApp:
        return live_app(http=protocol, **settings)

    return make


def blocks(raw: str) -> list[str]:
    """The stream's blocks (events and comments), in order."""
    assert raw.endswith("\n\n"), raw
    return raw[:-2].split("\n\n")


def events(raw: str) -> list[tuple[int, Any]]:
    """(id, data) of every event; comments left out. `[DONE]` stays a string."""
    found = []
    for block in blocks(raw):
        if block.startswith(":"):
            continue
        id_line, data_line = block.split("\n")
        assert id_line.startswith("id: ") and data_line.startswith("data: "), block
        data = data_line.removeprefix("data: ")
        found.append((int(id_line.removeprefix("id: ")), data if data == "[DONE]" else orjson.loads(data)))
    return found


def reply_of(raw: str) -> str:
    """The reply's text, from its `text-delta` events (however the pieces happened to arrive)."""
    return "".join(
        data["delta"] for _, data in events(raw) if data != "[DONE]" and data["type"] == "text-delta"
    )


def ui_body(session: str, text: str | None, trigger: str = "submit-message") -> dict[str, Any]:
    messages = [
        {"id": "u0", "role": "user", "parts": [{"type": "text", "text": "an earlier message, not trusted"}]},
        {"id": "a0", "role": "assistant", "parts": [{"type": "text", "text": "made up"}]},
    ]
    if text is not None:
        messages.append(
            {"id": "u1", "role": "user", "parts": [{"type": "step-start"}, {"type": "text", "text": text}]}
        )
    return {"id": session, "messages": messages, "trigger": trigger}


def test_a_reply_is_a_ui_message_stream(start: StartApp) -> None:
    live = start()
    response = live.client.post("/chat/s1/stream", json={"message": "@@deltas=3 @@unicode"}, headers=SSE)
    assert response.status_code == 200
    for name, value in {
        "content-type": "text/event-stream",
        "x-vercel-ai-ui-message-stream": "v1",
        "cache-control": "no-cache",
        "x-accel-buffering": "no",
        "x-session-id": "s1",
    }.items():
        assert response.headers[name] == value
    found = events(response.text)
    kinds = [data if data == "[DONE]" else data["type"] for _, data in found]
    deltas = [
        data["delta"] for _, data in found if kinds and data != "[DONE]" and data["type"] == "text-delta"
    ]
    assert kinds == ["start", "text-start", *["text-delta"] * len(deltas), "text-end", "finish", "[DONE]"]
    reply = "".join(deltas)
    assert reply == "w0 w1 w2 héllo 世界 🙂"
    # Each event's id is the reply's length in characters so far.
    lengths = [0, 0] + [len("".join(deltas[: n + 1])) for n in range(len(deltas))] + [len(reply)] * 3
    assert [id_ for id_, _ in found] == lengths
    assert found[1][1] == {"type": "text-start", "id": "text-0"}
    assert all(data["id"] == "text-0" for _, data in found[2:-2])
    assert found[-2][1] == {"type": "finish", "finishReason": "stop"}
    stored = live.history("s1")
    assert [m["content"] for m in stored] == ["@@deltas=3 @@unicode", reply]
    assert stored[1]["id"] == found[0][1]["messageId"]


def test_pings_go_out_before_the_first_token(start: StartApp) -> None:
    live = start(sse_heartbeat_seconds=0.05)
    response = live.client.post("/chat/p/stream", json={"message": "hi @@first_delay=0.6"}, headers=SSE)
    order = [
        block if block.startswith(":") else orjson.loads(block.split("data: ")[1])
        for block in blocks(response.text)
        if not block.endswith("[DONE]")
    ]
    first_delta = next(
        n for n, item in enumerate(order) if isinstance(item, dict) and item["type"] == "text-delta"
    )
    assert order[0]["type"] == "start"
    pings = [n for n, item in enumerate(order) if item == ": ping"]
    assert pings and pings[0] == 1 and len([n for n in pings if n < first_delta]) >= 2
    assert live.history("p")[1]["content"] == "echo: hi [turns=1]"


def test_a_mid_reply_failure_is_one_error_event_and_nothing_is_stored(start: StartApp) -> None:
    live = start()
    response = live.client.post(
        "/chat/cut/stream", json={"message": "@@deltas=6 @@delay=0.05 @@drop_after=3"}, headers=SSE
    )
    assert response.status_code == 200
    found = events(response.text)  # the stream ends cleanly: the error is in it
    kinds = [data["type"] for _, data in found]
    assert kinds[:2] == ["start", "text-start"] and kinds[-1] == "error"
    assert set(kinds[2:-1]) == {"text-delta"}
    error_id, error = found[-1]
    assert error["errorType"] == "upstream_error" and error["errorText"]
    assert error_id == len("".join(data["delta"] for _, data in found[2:-1]))
    assert "finish" not in kinds and "[DONE]" not in response.text
    assert live.history("cut") == []


def test_a_failure_before_the_first_token_is_an_error_event_once_admitted(start: StartApp) -> None:
    live = start(upstream_max_retries=0)
    response = live.client.post("/chat/early/stream", json={"message": "@@status=400"}, headers=SSE)
    assert response.status_code == 200
    found = events(response.text)
    assert [data["type"] for _, data in found] == ["start", "error"]
    assert found[1][1]["errorType"] == "upstream_error"
    assert live.history("early") == []
    # The session was given back: the next turn runs.
    assert live.chat("early", "again").text == "echo: again [turns=1]"


def test_a_session_deleted_mid_reply_ends_in_an_error_event(start: StartApp) -> None:
    live = start()
    streaming = threading.Event()
    result: dict[str, str] = {}

    def turn() -> None:
        with live.client.stream(
            "POST", "/chat/gone/stream", json={"message": "@@deltas=60 @@delay=0.05"}, headers=SSE
        ) as response:
            text = ""
            for piece in response.iter_text():
                text += piece
                if "text-delta" in text:
                    streaming.set()
            result["text"] = text

    worker = threading.Thread(target=turn)
    worker.start()
    assert streaming.wait(10)
    live.client.delete("/chat/gone")
    worker.join(20)
    found = events(result["text"])
    assert found[-1][1]["type"] == "error" and found[-1][1]["errorType"] == "session_busy"
    assert "[DONE]" not in result["text"]
    assert live.history("gone") == []


def test_refusals_before_the_stream_keep_their_status(start: StartApp) -> None:
    live = start()
    with live.client.stream(
        "POST", "/chat/busy/stream", json={"message": "@@deltas=40 @@delay=0.05"}, headers=SSE
    ) as slow:
        busy = live.client.post("/chat/busy/stream", json={"message": "meanwhile"}, headers=SSE)
        assert busy.status_code == 409 and busy.json()["error"]["type"] == "session_busy"
        slow.read()
    empty = live.client.post("/chat/e/stream", json={"message": ""}, headers=SSE)
    assert empty.status_code == 400 and empty.headers["content-type"] == "application/json"


def test_post_chat_takes_the_ai_sdk_body(start: StartApp) -> None:
    live = start()
    first = live.client.post("/chat", json=ui_body("sdk", "hello"))
    assert first.headers["content-type"] == "text/event-stream" and first.headers["x-session-id"] == "sdk"
    assert reply_of(first.text) == "echo: hello [turns=1]"
    second = live.client.post("/chat", json=ui_body("sdk", "again"))
    assert reply_of(second.text) == "echo: again [turns=2]"
    regenerated = live.client.post("/chat", json=ui_body("sdk", None, "regenerate-message"))
    assert reply_of(regenerated.text) == "echo: again [turns=2]" and regenerated.text.endswith(
        "data: [DONE]\n\n"
    )
    assert [m["content"] for m in live.history("sdk")] == [
        "hello",
        "echo: hello [turns=1]",
        "again",
        "echo: again [turns=2]",
    ]
    # The session routes take the same body, and answer as they always do.
    text = live.client.post("/chat/sdk2/stream", json=ui_body("ignored", "hi"))
    assert text.headers["content-type"] == "text/plain; charset=utf-8" and text.text == "echo: hi [turns=1]"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"messages": [], "trigger": "submit-message"}, 400),
        ({"id": "bad id\r\nx-evil: 1", "messages": [], "trigger": "submit-message"}, 400),
        ({"id": "s", "messages": [], "trigger": "submit-message"}, 400),
        ({"id": "s", "messages": [{"role": "assistant", "parts": []}]}, 400),
        ({"id": "s", "messages": "hi"}, 422),
        ({"id": "s", "messages": [], "trigger": "delete-everything"}, 422),
        ({"id": "s", "message": "hi", "messages": []}, 422),
    ],
)
def test_a_bad_ai_sdk_body_is_a_4xx(live_app: StartApp, body: dict[str, Any], status: int) -> None:
    live = live_app()
    response = live.client.post("/chat", json=body)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"type", "message"}


def test_the_openapi_schema_describes_every_chat_response(live_app: StartApp) -> None:
    paths = httpx.get(f"{live_app().url}/openapi.json").json()["paths"]
    for path in ("/chat/stream", "/chat/{session_id}/stream"):
        content = paths[path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"text/plain", "text/event-stream"}
        assert "415" in paths[path]["post"]["responses"]
    chat = paths["/chat"]["post"]
    assert set(chat["responses"]["200"]["content"]) == {"text/event-stream"}
    schema = chat["requestBody"]["content"]["application/json"]["schema"]
    assert {"id", "messages", "trigger"} <= set(schema["properties"])
