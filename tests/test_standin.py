from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import anthropic
import httpx2
import orjson
import pytest
from anthropic.types import Message, MessageParam

from api.dev.standin import MAX_RECORDED, StandInModel, StandInThread
from tests.conftest import until

MODEL = "claude-test"


@pytest.fixture
async def standin() -> AsyncIterator[StandInModel]:
    """A fresh server per test, so its counters and recorded requests start empty."""
    model = StandInModel()
    await model.start()
    try:
        yield model
    finally:
        await model.stop()


@pytest.fixture
async def client(standin: StandInModel) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with sdk(standin.url) as c:
        yield c


def sdk(
    url: str, *, api_key: str = "test-key", max_retries: int = 0, timeout: float | httpx2.Timeout = 5.0
) -> anthropic.AsyncAnthropic:
    # A bounded timeout, so a broken server fails a test instead of hanging it.
    return anthropic.AsyncAnthropic(base_url=url, api_key=api_key, max_retries=max_retries, timeout=timeout)


@contextmanager
def broken_mid_stream(cause: type[httpx2.TransportError]) -> Iterator[None]:
    """The stream fails with ``cause``: raised bare by SDKs up to 2.1x, wrapped in an
    APIConnectionError (timeouts: APITimeoutError) from 2.17 on. Either way the wire did the same."""
    with pytest.raises((cause, anthropic.APIConnectionError)) as caught:
        yield
    if isinstance(caught.value, anthropic.APIConnectionError):
        assert isinstance(caught.value.__cause__, cause)
        if issubclass(cause, httpx2.TimeoutException):
            assert isinstance(caught.value, anthropic.APITimeoutError)


def text_of(message: Message) -> str:
    [block] = message.content
    assert block.type == "text"
    return block.text


def user(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


async def stream_text(client: anthropic.AsyncAnthropic, text: str, got: list[str] | None = None) -> Message:
    """Stream a reply, collecting text deltas into ``got``; return the final message."""
    got = [] if got is None else got
    async with client.messages.stream(model=MODEL, max_tokens=100, messages=user(text)) as stream:
        async for piece in stream.text_stream:
            got.append(piece)
        return await stream.get_final_message()


# --- normal replies ----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_stream_echoes_word_by_word(client: anthropic.AsyncAnthropic, standin: StandInModel) -> None:
    events: list[str] = []
    pieces: list[str] = []
    async with client.messages.stream(model=MODEL, max_tokens=100, messages=user("Hello   there")) as stream:
        async for event in stream:
            events.append(event.type)
            if event.type == "text":
                pieces.append(event.text)
        final = await stream.get_final_message()
        assert stream.request_id is not None
        assert stream.request_id.startswith("req_")

    assert pieces == ["echo: ", "Hello ", "there ", "[turns=1]"]
    assert final.content[0].type == "text"
    assert final.content[0].text == "echo: Hello there [turns=1]"
    assert final.stop_reason == "end_turn"
    assert final.model == MODEL
    assert final.usage.output_tokens == 4
    assert final.usage.input_tokens == len("Hello   there") // 4
    assert events[:2] == ["message_start", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert (standin.streams_started, standin.streams_completed, standin.active_streams) == (1, 1, 0)
    assert standin.streams_cancelled == 0


@pytest.mark.anyio
async def test_turns_counts_user_messages_and_takes_text_blocks(client: anthropic.AsyncAnthropic) -> None:
    messages: list[MessageParam] = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "echo: first [turns=1]"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": [{"type": "text", "text": "echo: second [turns=2]"}]},
        {"role": "user", "content": [{"type": "text", "text": "third"}, {"type": "text", "text": "part"}]},
    ]
    async with client.messages.stream(
        model=MODEL, max_tokens=100, system="be brief", messages=messages
    ) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "text"
    assert final.content[0].text == "echo: third part [turns=3]"
    chars = len("be brief") + sum(len(t) for t in ("first", "echo: first [turns=1]", "second"))
    chars += len("echo: second [turns=2]") + len("third") + len("part")
    assert final.usage.input_tokens == chars // 4


@pytest.mark.anyio
async def test_deltas_directive_sets_reply_size(client: anthropic.AsyncAnthropic) -> None:
    got: list[str] = []
    final = await stream_text(client, "ignored words @@deltas=7", got)
    assert got == [f"w{i} " for i in range(7)]
    assert final.usage.output_tokens == 7


@pytest.mark.anyio
async def test_delta_chars_directive_pads_each_delta(client: anthropic.AsyncAnthropic) -> None:
    got: list[str] = []
    await stream_text(client, "@@deltas=12 @@delta_chars=6", got)
    assert got[:2] == ["w0xxx ", "w1xxx "]
    assert got[10:] == ["w10xx ", "w11xx "]
    assert {len(text) for text in got} == {6}


@pytest.mark.anyio
async def test_unicode_directive(client: anthropic.AsyncAnthropic) -> None:
    got: list[str] = []
    final = await stream_text(client, "hi @@unicode", got)
    assert "".join(got) == "echo: hi [turns=1] héllo 世界 🙂"
    assert got[-3:] == ["héllo ", "世界 ", "🙂"]
    assert final.stop_reason == "end_turn"


@pytest.mark.anyio
async def test_pings_and_unknown_events_do_not_disturb_the_sdk(client: anthropic.AsyncAnthropic) -> None:
    got: list[str] = []
    final = await stream_text(client, "a b c @@pings", got)
    assert "".join(got) == "echo: a b c [turns=1]"
    assert final.stop_reason == "end_turn"


@pytest.mark.anyio
async def test_non_streaming_create_and_count_tokens(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(model=MODEL, max_tokens=100, messages=user("plain @@deltas=3"))
    assert message.content[0].type == "text"
    assert message.content[0].text == "w0 w1 w2 "
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 3
    counted = await client.messages.count_tokens(model=MODEL, messages=user("x" * 40), system="y" * 8)
    assert counted.input_tokens == 12


@pytest.mark.anyio
async def test_requests_are_recorded(client: anthropic.AsyncAnthropic, standin: StandInModel) -> None:
    await stream_text(client, "remember me")
    [request] = standin.requests
    assert (request.method, request.path) == ("POST", "/v1/messages")
    assert request.body is not None
    assert request.body["messages"] == user("remember me")
    assert request.body["stream"] is True
    assert request.headers["authorization"] == "Bearer test-key"
    assert request.headers["x-stainless-retry-count"] == "0"


@pytest.mark.anyio
async def test_delays(client: anthropic.AsyncAnthropic) -> None:
    start = time.monotonic()
    await stream_text(client, "@@deltas=4 @@delay=0.05 @@first_delay=0.1")
    assert 0.3 <= time.monotonic() - start < 1.5


@pytest.mark.anyio
async def test_server_default_delay() -> None:
    async with (
        StandInModel(delay=0.05) as standin,
        sdk(standin.url) as client,
    ):
        start = time.monotonic()
        await stream_text(client, "@@deltas=4")
        assert time.monotonic() - start >= 0.2
        start = time.monotonic()
        await stream_text(client, "@@deltas=4 @@delay=0")
        assert time.monotonic() - start < 0.15


@pytest.mark.anyio
async def test_many_concurrent_streams(client: anthropic.AsyncAnthropic, standin: StandInModel) -> None:
    finals = await asyncio.gather(*(stream_text(client, f"n{i} @@delay=0.01") for i in range(50)))
    assert [text_of(f) for f in finals] == [f"echo: n{i} [turns=1]" for i in range(50)]
    assert standin.streams_completed == 50
    assert standin.active_streams == 0


# --- HTTP errors and retries -------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (413, anthropic.RequestTooLargeError, "request_too_large"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
async def test_status_directive_maps_to_sdk_errors(
    client: anthropic.AsyncAnthropic,
    status: int,
    error_class: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    with pytest.raises(error_class) as caught:
        await stream_text(client, f"@@status={status}")
    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == error_type
    assert caught.value.request_id is not None
    with pytest.raises(error_class):
        await client.messages.create(model=MODEL, max_tokens=10, messages=user(f"@@status={status}"))


@pytest.mark.anyio
async def test_overloaded_is_retried_then_raised(standin: StandInModel) -> None:
    async with sdk(standin.url, max_retries=2) as client:
        with pytest.raises(anthropic.OverloadedError):
            await stream_text(client, "@@status=529 @@retry_after=0.01")
    assert [r.headers["x-stainless-retry-count"] for r in standin.requests] == ["0", "1", "2"]
    assert standin.streams_started == 0


@pytest.mark.anyio
async def test_fail_attempts_succeeds_on_retry(standin: StandInModel) -> None:
    async with sdk(standin.url, max_retries=2) as client:
        final = await stream_text(client, "hi @@status=529 @@fail_attempts=1 @@retry_after=0.01")
    assert text_of(final) == "echo: hi [turns=1]"
    assert [r.headers["x-stainless-retry-count"] for r in standin.requests] == ["0", "1"]


@pytest.mark.anyio
async def test_retry_after_is_honoured(standin: StandInModel) -> None:
    # The SDK's own first backoff is 0.375-0.5 s, so both a longer and a shorter wait prove the header is used.
    async with sdk(standin.url, max_retries=1) as client:
        start = time.monotonic()
        await stream_text(client, "@@status=429 @@fail_attempts=1 @@retry_after=0.6")
        assert 0.6 <= time.monotonic() - start < 1.5
        start = time.monotonic()
        await stream_text(client, "@@status=503 @@fail_attempts=1 @@retry_after=0.02")
        assert time.monotonic() - start < 0.3
    assert len(standin.requests) == 4


@pytest.mark.anyio
async def test_error_response_headers(standin: StandInModel) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 5,
        "messages": user("@@status=529 @@retry_after=2.5 @@should_retry=false"),
    }
    async with httpx2.AsyncClient(base_url=standin.url, timeout=5.0) as raw:
        response = await raw.post("/v1/messages", json=body, headers={"x-api-key": "k"})
    assert response.status_code == 529
    assert response.headers["retry-after"] == "2.5"
    assert response.headers["x-should-retry"] == "false"
    assert response.json() == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": response.headers["request-id"],
    }


@pytest.mark.anyio
async def test_should_retry_false_stops_retries(standin: StandInModel) -> None:
    async with sdk(standin.url, max_retries=2) as client:
        with pytest.raises(anthropic.OverloadedError):
            await stream_text(client, "@@status=529 @@should_retry=false")
    assert len(standin.requests) == 1


@pytest.mark.anyio
async def test_api_key_is_checked_when_configured() -> None:
    async with StandInModel(api_key="right") as standin:
        async with sdk(standin.url, api_key="wrong") as client:
            with pytest.raises(anthropic.AuthenticationError) as caught:
                await stream_text(client, "hi")
            assert isinstance(caught.value.body, dict)
            assert caught.value.body["error"]["type"] == "authentication_error"
        async with sdk(standin.url, api_key="right") as client:
            assert (await stream_text(client, "hi")).stop_reason == "end_turn"
        async with httpx2.AsyncClient(base_url=standin.url, timeout=5.0) as raw:
            body = {"model": MODEL, "max_tokens": 5, "messages": user("hi")}
            ok = await raw.post("/v1/messages", json=body, headers={"x-api-key": "right"})
            assert ok.status_code == 200
            assert ok.json()["content"][0]["text"] == "echo: hi [turns=1]"
            missing = await raw.post("/v1/messages", json=body)
            assert missing.status_code == 401


@pytest.mark.anyio
async def test_any_key_passes_but_none_fails(standin: StandInModel) -> None:
    body = {"model": MODEL, "max_tokens": 5, "messages": user("hi")}
    async with httpx2.AsyncClient(base_url=standin.url, timeout=5.0) as raw:
        assert (
            await raw.post("/v1/messages", json=body, headers={"x-api-key": "anything"})
        ).status_code == 200
        missing = await raw.post("/v1/messages", json=body)
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        assert missing.headers["request-id"].startswith("req_")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[1, 2]",
        b"",
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "m", "max_tokens": 5}',
        b'{"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "@@delay=soon"}]}',
        b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "@@status=200"}]}',
    ],
)
async def test_invalid_requests_get_400(standin: StandInModel, content: bytes) -> None:
    headers = {"authorization": "Bearer k", "content-type": "application/json"}
    async with httpx2.AsyncClient(base_url=standin.url, timeout=5.0) as raw:
        response = await raw.post("/v1/messages", content=content, headers=headers)
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["request_id"] == response.headers["request-id"]


@pytest.mark.anyio
async def test_unknown_path_is_404(standin: StandInModel) -> None:
    async with httpx2.AsyncClient(base_url=standin.url, timeout=5.0) as raw:
        response = await raw.get("/v1/models", headers={"x-api-key": "k"})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    assert standin.requests[-1].path == "/v1/models"


# --- mid-stream faults -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_error_after_raises_plain_status_error(
    client: anthropic.AsyncAnthropic, standin: StandInModel
) -> None:
    got: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        await stream_text(client, "a b c d @@error_after=2", got)
    assert type(caught.value) is anthropic.APIStatusError
    assert caught.value.status_code == 200
    assert caught.value.type == "overloaded_error"
    assert got == ["echo: ", "a "]
    # the chunked body ended properly, so the connection stays usable
    assert (await stream_text(client, "again")).stop_reason == "end_turn"
    assert standin.streams_faulted == 1
    assert standin.streams_cancelled == 0


@pytest.mark.anyio
async def test_drop_after_resets_the_connection(
    client: anthropic.AsyncAnthropic, standin: StandInModel
) -> None:
    got: list[str] = []
    with broken_mid_stream(httpx2.ReadError):
        await stream_text(client, "a b c d @@drop_after=2", got)
    assert got == ["echo: ", "a "]
    assert (await stream_text(client, "again")).stop_reason == "end_turn"


@pytest.mark.anyio
async def test_close_after_is_an_incomplete_chunked_body(client: anthropic.AsyncAnthropic) -> None:
    got: list[str] = []
    with broken_mid_stream(httpx2.RemoteProtocolError):
        await stream_text(client, "a b c d @@close_after=3", got)
    assert got == ["echo: ", "a ", "b "]


@pytest.mark.anyio
async def test_eof_after_ends_without_stop_reason(
    client: anthropic.AsyncAnthropic, standin: StandInModel
) -> None:
    got: list[str] = []
    final = await stream_text(client, "a b c d @@eof_after=1", got)
    assert got == ["echo: "]
    assert final.stop_reason is None
    assert standin.streams_completed == 0
    assert standin.streams_faulted == 1


@pytest.mark.anyio
async def test_hang_after_times_out_and_counts_as_cancelled(standin: StandInModel) -> None:
    got: list[str] = []
    async with sdk(standin.url, timeout=httpx2.Timeout(0.3)) as client:
        with broken_mid_stream(httpx2.ReadTimeout):
            await stream_text(client, "a b c @@hang_after=2", got)
    assert got == ["echo: ", "a "]
    await until(lambda: standin.streams_cancelled == 1)
    assert standin.active_streams == 0


@pytest.mark.anyio
async def test_hang_before_is_a_timeout_before_headers(standin: StandInModel) -> None:
    async with sdk(standin.url, timeout=0.3) as client:
        with pytest.raises(anthropic.APITimeoutError):
            await stream_text(client, "@@hang_before")
    await until(lambda: standin.streams_cancelled == 1)
    assert standin.streams_started == 1
    assert standin.active_streams == 0


@pytest.mark.anyio
async def test_leaving_a_stream_early_counts_as_cancelled(
    client: anthropic.AsyncAnthropic, standin: StandInModel
) -> None:
    async with client.messages.stream(
        model=MODEL, max_tokens=100, messages=user("@@deltas=100 @@delay=0.02")
    ) as stream:
        async for _ in stream.text_stream:
            break
    await until(lambda: standin.streams_cancelled == 1)
    assert standin.active_streams == 0
    assert standin.streams_completed == 0


@pytest.mark.anyio
async def test_stop_closes_open_streams() -> None:
    standin = StandInModel()
    await standin.start()
    try:
        async with (
            sdk(standin.url) as client,
            client.messages.stream(model=MODEL, max_tokens=100, messages=user("@@hang_after=1")) as stream,
        ):
            await until(lambda: standin.active_streams == 1)
            await standin.stop()
            with broken_mid_stream(httpx2.TransportError):
                async for _ in stream.text_stream:
                    pass
    finally:
        await standin.stop()
    assert standin.streams_cancelled == 1
    assert standin.active_streams == 0


# --- the wire itself ---------------------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(5):
        return await _read_response(reader)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    chunks: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, headers, b"".join(chunks)
        chunks.append(chunk[:-2])


def raw_request(text: str, *, stream: bool = True) -> bytes:
    body = orjson.dumps({"model": MODEL, "max_tokens": 5, "messages": user(text), "stream": stream})
    head = f"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


@pytest.mark.anyio
async def test_pipelined_and_fragmented_requests(standin: StandInModel) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", standin.port)
    try:
        # two requests in one write, then a third one byte at a time
        writer.write(raw_request("one") + raw_request("two", stream=False))
        third = raw_request("three")
        for i in range(len(third)):
            writer.write(third[i : i + 1])
            await writer.drain()
        first = await read_response(reader)
        second = await read_response(reader)
        last = await read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()
    assert first[0] == second[0] == last[0] == 200
    assert first[1]["content-type"] == "text/event-stream; charset=utf-8"
    assert first[1]["transfer-encoding"] == "chunked"
    assert first[1]["request-id"].startswith("req_")
    assert b'"text":"one "' in first[2]
    assert first[2].endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert orjson.loads(second[2])["content"][0]["text"] == "echo: two [turns=1]"
    assert b'"text":"three "' in last[2]


@pytest.mark.anyio
async def test_sse_wire_format(standin: StandInModel) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", standin.port)
    try:
        writer.write(raw_request("x y @@pings"))
        _, _, body = await read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()
    events = body.decode().split("\n\n")
    assert events.pop() == ""
    names = [e.split("\n")[0] for e in events]
    assert names[:3] == ["event: message_start", "event: content_block_start", "event: ping"]
    assert names.count("event: future_event") == 3  # between each pair of the 4 deltas
    assert sum(1 for e in events if e.startswith("data: ")) == 1
    assert names[-3:] == ["event: content_block_stop", "event: message_delta", "event: message_stop"]
    start = orjson.loads(events[0].split("data: ", 1)[1])
    assert start["message"]["usage"]["output_tokens"] == 1
    delta = orjson.loads(events[-2].split("data: ", 1)[1])
    assert delta == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 4},
    }


@pytest.mark.anyio
async def test_error_event_ends_the_body_and_keeps_the_connection(standin: StandInModel) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", standin.port)
    try:
        writer.write(raw_request("a b c @@error_after=1") + raw_request("next"))
        _, _, failed = await read_response(reader)
        _, _, after = await read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()
    error = failed.decode().split("\n\n")[-2]
    assert error.startswith('event: error\ndata: {"type":"error","error":{"type":"overloaded_error"')
    assert failed.count(b"text_delta") == 1
    assert after.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


@pytest.mark.anyio
async def test_connection_close_is_honoured(standin: StandInModel) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", standin.port)
    try:
        request = raw_request("bye", stream=False).replace(
            b"host: x\r\n", b"host: x\r\nconnection: close\r\n"
        )
        writer.write(request)
        status, headers, _ = await read_response(reader)
        assert status == 200
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.anyio
async def test_slow_reader_gets_the_whole_stream(standin: StandInModel) -> None:
    # ~12 MB of reply: more than the socket buffers hold, so the server must wait for the reader.
    word = "x" * 500_000
    reader, writer = await asyncio.open_connection("127.0.0.1", standin.port)
    try:
        writer.write(raw_request(" ".join([word] * 24)))
        await until(lambda: standin.active_streams == 1)
        await asyncio.sleep(0.2)
        _, _, body = await read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()
    assert body.count(b"text_delta") == 26
    assert body.count(word.encode()) == 24
    assert standin.streams_completed == 1


@pytest.mark.anyio
async def test_count_tokens_honours_status(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.RateLimitError):
        await client.messages.count_tokens(model=MODEL, messages=user("@@status=429"))


@pytest.mark.anyio
async def test_recorded_requests_are_bounded(client: anthropic.AsyncAnthropic, standin: StandInModel) -> None:
    await client.messages.count_tokens(model=MODEL, messages=user("first"))
    first = standin.requests[0]
    standin.requests.extend([first] * (MAX_RECORDED - 1))
    await client.messages.count_tokens(model=MODEL, messages=user("last"))
    assert len(standin.requests) == MAX_RECORDED
    assert standin.requests[-1].body == {"model": MODEL, "messages": user("last")}


# --- synchronous use and the command line ------------------------------------------------------------------


def test_thread_serves_sync_clients() -> None:
    with StandInThread(delay=0.001) as standin:
        with anthropic.Anthropic(base_url=standin.url, api_key="k", max_retries=0, timeout=5.0) as client:
            with client.messages.stream(model=MODEL, max_tokens=10, messages=user("sync")) as stream:
                text = "".join(stream.text_stream)
            assert text == "echo: sync [turns=1]"
            counted = client.messages.count_tokens(model=MODEL, messages=user("12345678"))
            assert counted.input_tokens == 2
        assert standin.streams_completed == 1
        assert len(standin.requests) == 2


def test_command_line_serves_until_terminated() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.dev.standin", "--port", "0", "--delay", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split()[-1]
        assert url.startswith("http://127.0.0.1:")
        with anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=5.0) as client:
            reply = client.messages.create(model=MODEL, max_tokens=10, messages=user("cli"))
        assert reply.content[0].type == "text"
        assert reply.content[0].text == "echo: cli [turns=1]"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_thread_reports_a_failure_to_start() -> None:
    with (
        StandInThread() as first,
        pytest.raises(OSError, match="address already in use"),
        StandInThread(port=first.port),
    ):
        pass
