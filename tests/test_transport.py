"""`LeanTransport` against real loopback sockets: servers here write every response byte by hand."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anthropic
import httpx2
import orjson
import pytest

from api.dev.standin import StandInModel
from api.upstream.transport import BODY, BodyStream, LeanTransport
from tests.conftest import until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]

MODEL = "claude-test"


# --- a server whose bytes the test writes ---------------------------------------------------------------


@dataclass
class Seen:
    """One request as it arrived on the wire."""

    head: bytes  # the request line and headers, without the blank line
    body: bytes

    @property
    def line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def target(self) -> str:
        return self.line.split(b" ")[1].decode()

    def header(self, name: str) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.encode():
                return value.strip()
        return None


# Answers one request; returns whether the connection should stay open for another.
Respond = Callable[[Seen, asyncio.StreamWriter], Awaitable[bool]]


class Server:
    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.connections = 0  # accepted
        self.ended = 0  # connections that are over, from either side
        self.seen: list[Seen] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        await asyncio.sleep(0.01)  # the closed sockets' connection_lost runs a loop iteration later

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen = Seen(head[:-4], b"")
                seen.body = await reader.readexactly(int(seen.header("content-length") or 0))
                self.seen.append(seen)
                if not await self.respond(seen, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            self._tasks.discard(task)
            self.ended += 1
            writer.close()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN."""
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def respond_with(*parts: bytes, keep: bool = True, gap: float = 0.002) -> Respond:
    """Write `parts` as separate reads (a pause between each), then keep or close the connection."""

    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(gap)
            writer.write(part)
        return keep

    return respond


def length_response(body: bytes, *headers: bytes) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\n%bcontent-length: %d\r\n\r\n%b" % (head, len(body), body)


@contextlib.asynccontextmanager
async def lean_client(
    timeouts: httpx2.Timeout | float = 5.0, max_connections: int = 100
) -> AsyncIterator[httpx2.AsyncClient]:
    limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    client = httpx2.AsyncClient(transport=LeanTransport(limits=limits), timeout=timeouts)
    try:
        yield client
    finally:
        await client.aclose()
        await asyncio.sleep(0.01)  # aborted sockets close when their connection_lost runs


async def read_body(response: httpx2.Response) -> bytes:
    """Read straight from the transport's `Body`, the way the relay does."""
    stream = response.extensions[BODY]
    assert isinstance(stream, BodyStream)
    return b"".join([chunk async for chunk in stream.body.chunks()])


class Collector:
    """A sink for `Body.pipe`: what was pushed, and a future for how the body ended."""

    def __init__(self, into: bytearray) -> None:
        self.into = into
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_data: Callable[[bytes], None] | None = None

    def body_data(self, data: bytes) -> None:
        self.into += data
        if self.on_data is not None:
            self.on_data(data)

    def body_end(self, error: Exception | None) -> None:
        assert not self.ended.done(), "a body ends once"
        if error is None:
            self.ended.set_result(None)
        else:
            self.ended.set_exception(error)


# The three ways a body is read: through httpx, pulled from the transport's `Body`, or pushed by it.
READERS = ["httpx", "body", "pipe"]


async def collect(response: httpx2.Response, into: bytearray, *, via: str) -> None:
    """Read the body into `into` as it comes, so what arrived before a failure can be checked."""
    if via == "pipe":
        sink = Collector(into)
        response.extensions[BODY].body.pipe(sink)
        await sink.ended
        return
    source = response.extensions[BODY].body.chunks() if via == "body" else response.aiter_raw()
    async for chunk in source:
        into += chunk


# --- chunked bodies ---------------------------------------------------------------------------------------

PAYLOADS = [b"hello", b", chunked world of bytes!", b"\r\n0", b"x" * 300]
CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
    + b"%X;name=value;flag\r\n%b\r\n" % (len(PAYLOADS[0]), PAYLOADS[0])
    + b"".join(b"%X\r\n%b\r\n" % (len(p), p) for p in PAYLOADS[1:])
    + b"0;last\r\nx-checksum: abc\r\nx-other: 1\r\n\r\n"
)


async def test_chunked_body_split_at_every_byte_boundary_arrives_intact() -> None:
    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        cut = int(seen.target.split("=")[1])
        writer.write(CHUNKED[:cut])
        await asyncio.sleep(0.001)  # long enough for the client to read the first part on its own
        writer.write(CHUNKED[cut:])
        return True

    async with Server(respond) as server, lean_client() as client:
        for cut in range(1, len(CHUNKED)):
            response = await client.get(f"{server.url}/?cut={cut}")
            assert response.status_code == 200, cut
            assert response.content == b"".join(PAYLOADS), cut
    # Every response was consumed to exactly its end, so one connection served them all.
    assert server.connections == 1


async def test_chunked_body_one_byte_per_read_through_body() -> None:
    parts = [CHUNKED[i : i + 1] for i in range(len(CHUNKED))]
    async with Server(respond_with(*parts, gap=0.0005)) as server, lean_client() as client:
        for _ in range(2):
            async with client.stream("GET", server.url) as response:
                assert response.headers["content-type"] == "text/plain"
                assert await read_body(response) == b"".join(PAYLOADS)
    assert server.connections == 1


async def test_chunk_extensions_and_trailers_are_not_body() -> None:
    response_bytes = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b'4;a=b\r\nwiki\r\n5;quoted="x;y"\r\npedia\r\n0\r\nexpires: never\r\nx-sum: 1\r\n\r\n'
    )
    async with Server(respond_with(response_bytes)) as server, lean_client() as client:
        first = await client.get(server.url)
        second = await client.get(server.url)
    assert first.content == second.content == b"wikipedia"
    assert "expires" not in first.headers
    assert server.connections == 1


@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",  # a size that is not hex
        b"3\r\nhello\r\n0\r\n\r\n",  # a payload longer than its size
        # What Python's int(x, 16) would take, and HTTP does not: a negative size would move backwards.
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
    ],
)
async def test_malformed_chunking_is_a_protocol_error(chunks: bytes) -> None:
    bad = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunks
    async with Server(respond_with(bad)) as server, lean_client() as client:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(server.url)


# --- content-length and close-delimited bodies ------------------------------------------------------------


@pytest.mark.parametrize(
    "length", [b"-5", b"+5", b"0x5", b"5_0", b"abc", b"5, 6", b"99999999999999999999999"]
)
async def test_a_malformed_content_length_is_a_protocol_error(length: bytes) -> None:
    bad = b"HTTP/1.1 200 OK\r\ncontent-length: %b\r\n\r\nhello" % length
    async with Server(respond_with(bad)) as server, lean_client() as client:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(server.url)


async def test_http_1_0_is_not_kept_alive_unless_it_says_so() -> None:
    plain = b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"
    kept = b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok"
    for response, connections in ((plain, 2), (kept, 1)):
        async with Server(respond_with(response)) as server, lean_client() as client:
            for _ in range(2):
                assert (await client.get(server.url)).content == b"ok"
        assert server.connections == connections, response


async def test_content_length_body_in_pieces_then_reuse() -> None:
    body = bytes(range(256)) * 40
    whole = length_response(body)
    parts = [whole[i : i + 1000] for i in range(0, len(whole), 1000)]
    async with Server(respond_with(*parts)) as server, lean_client() as client:
        first = await client.get(server.url)
        async with client.stream("GET", server.url) as response:
            second = await read_body(response)
    assert first.content == second == body
    assert first.headers["content-length"] == str(len(body))
    assert server.connections == 1


async def test_bytes_past_content_length_are_not_body_and_spoil_the_connection() -> None:
    async with Server(respond_with(length_response(b"hello") + b"EXTRA")) as server, lean_client() as client:
        first = await client.get(server.url)
        second = await client.get(server.url)
    assert first.content == second.content == b"hello"
    assert server.connections == 2


@pytest.mark.parametrize(
    ("method", "response_bytes"),
    [
        ("GET", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"),
    ],
)
async def test_empty_bodies_end_at_the_head(method: str, response_bytes: bytes) -> None:
    async with Server(respond_with(response_bytes)) as server, lean_client() as client:
        for _ in range(2):
            response = await client.request(method, server.url)
            assert response.content == b""
    # The parser cannot be told a HEAD's response has no body, so its connection is not reused.
    assert server.connections == (2 if method == "HEAD" else 1)


async def test_close_delimited_body_ends_at_fin() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n"
    parts = (head, b"read ", b"until ", b"the end")
    async with Server(respond_with(*parts, keep=False)) as server, lean_client() as client:
        first = await client.get(server.url)
        async with client.stream("GET", server.url) as response:
            second = await read_body(response)
    assert first.content == second == b"read until the end"
    assert server.connections == 2  # a body delimited by the close leaves nothing to reuse


async def test_interim_1xx_responses_are_skipped() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    hints = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
    final = length_response(b"done", b"x-final: yes")
    async with Server(respond_with(interim, hints, final)) as server, lean_client() as client:
        separate = await client.get(server.url)
        server.respond = respond_with(interim + hints + final)
        together = await client.get(server.url)
    for response in (separate, together):
        assert response.status_code == 200
        assert response.headers["x-final"] == "yes"
        assert "link" not in response.headers
        assert response.content == b"done"
    assert server.connections == 1


async def test_compressed_body_reaches_a_body_reader_decoded() -> None:
    # What the relay does: read `extensions[BODY]` when offered, httpx's decoded bytes otherwise.
    text = b"event: ping\ndata: {}\n\n" * 50
    raw = length_response(gzip.compress(text), b"content-encoding: gzip", b"content-type: text/event-stream")
    async with Server(respond_with(raw)) as server, lean_client() as client:
        async with client.stream("POST", server.url, content=b"{}") as response:
            body = response.extensions.get(BODY)
            got = await read_body(response) if body is not None else await response.aread()
        assert (await client.get(server.url)).content == text
    assert got == text


# --- keep-alive -------------------------------------------------------------------------------------------


async def test_keep_alive_reuses_the_connection() -> None:
    async with Server(respond_with(length_response(b"ok"))) as server, lean_client() as client:
        for _ in range(3):
            assert (await client.get(server.url)).content == b"ok"
    assert (server.connections, len(server.seen)) == (1, 3)


async def test_connection_close_is_not_reused() -> None:
    # The server keeps the socket open; only the header tells the client not to reuse it.
    response_bytes = length_response(b"ok", b"connection: close")
    async with Server(respond_with(response_bytes)) as server, lean_client() as client:
        for _ in range(2):
            assert (await client.get(server.url)).content == b"ok"
    assert server.connections == 2


async def test_body_not_read_to_the_end_is_not_reused() -> None:
    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.target == "/partial":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 100)
        else:
            writer.write(length_response(b"ok"))
        return True

    async with Server(respond) as server, lean_client() as client:
        async with client.stream("GET", f"{server.url}/partial") as response:
            assert response.status_code == 200
        assert (await client.get(f"{server.url}/whole")).content == b"ok"
        await until(lambda: server.ended == 1)  # the half-read connection was closed, not parked
    assert server.connections == 2


async def test_idle_connection_closed_by_the_server_is_replaced() -> None:
    async with Server(respond_with(length_response(b"ok"), keep=False)) as server, lean_client() as client:
        assert (await client.get(server.url)).content == b"ok"
        await until(lambda: server.ended == 1)
        await asyncio.sleep(0.02)  # the client's loop sees the FIN
        assert (await client.get(server.url)).content == b"ok"
    assert server.connections == 2


# --- failures ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", READERS)
async def test_reset_mid_body_is_a_read_error(via: str) -> None:
    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await asyncio.sleep(0.05)
        reset(writer)
        return False

    got = bytearray()
    async with (
        Server(respond) as server,
        lean_client() as client,
        client.stream("GET", server.url) as response,
    ):
        with pytest.raises(httpx2.ReadError):
            await collect(response, got, via=via)
    assert got == b"hello"


@pytest.mark.parametrize(
    "response_bytes",
    [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",  # no final chunk
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n",  # no blank line
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
    ],
)
@pytest.mark.parametrize("via", READERS)
async def test_fin_before_the_body_ends_is_a_protocol_error(response_bytes: bytes, via: str) -> None:
    got = bytearray()
    async with (
        Server(respond_with(response_bytes, keep=False)) as server,
        lean_client() as client,
        client.stream("GET", server.url) as response,
    ):
        with pytest.raises(httpx2.RemoteProtocolError):
            await collect(response, got, via=via)
    assert got == b"hello"


@pytest.mark.parametrize(("close", "error"), [("fin", httpx2.RemoteProtocolError), ("rst", httpx2.ReadError)])
async def test_close_before_any_response(close: str, error: type[Exception]) -> None:
    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if close == "rst":
            reset(writer)
        return False

    async with Server(respond) as server, lean_client() as client:
        with pytest.raises(error):
            await client.get(server.url)


async def test_sdk_retries_a_connection_closed_before_the_response() -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "second time lucky"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 3},
    }

    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if len(server.seen) == 1:
            return False  # the first attempt: hang up with no answer
        writer.write(length_response(orjson.dumps(message), b"content-type: application/json"))
        return True

    async with Server(respond) as server:
        http = anthropic.DefaultAsyncHttpxClient(transport=LeanTransport())
        async with anthropic.AsyncAnthropic(
            base_url=server.url, api_key="test-key", max_retries=1, timeout=5.0, http_client=http
        ) as client:
            reply = await client.messages.create(
                model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )
        await asyncio.sleep(0.01)
    assert reply.content[0].type == "text"
    assert reply.content[0].text == "second time lucky"
    assert [s.header("x-stainless-retry-count") for s in server.seen] == [b"0", b"1"]
    assert server.connections == 2


async def test_connect_refused_is_a_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket closes
    async with lean_client() as client:
        with pytest.raises(httpx2.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")


async def test_response_head_too_large_is_a_protocol_error() -> None:
    endless = b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"a" * 70_000
    async with Server(respond_with(endless)) as server, lean_client() as client:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(server.url)


async def test_malformed_status_line_is_a_protocol_error() -> None:
    async with Server(respond_with(b"SPDY/3 200 OK\r\n\r\n")) as server, lean_client() as client:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(server.url)


# --- read timeouts ----------------------------------------------------------------------------------------


async def stall_forever(seen: Seen, writer: asyncio.StreamWriter) -> bool:
    await asyncio.Event().wait()
    return False


async def test_read_timeout_before_the_head() -> None:
    async with Server(stall_forever) as server, lean_client(httpx2.Timeout(5.0, read=1.5)) as client:
        start = time.monotonic()
        with pytest.raises(httpx2.ReadTimeout):
            await client.get(server.url)
        assert 1.4 < time.monotonic() - start < 3.0


@pytest.mark.parametrize("via", READERS)
async def test_read_timeout_mid_body(via: str) -> None:
    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nsome")
        return await stall_forever(seen, writer)

    got = bytearray()
    async with (
        Server(respond) as server,
        lean_client(httpx2.Timeout(5.0, read=1.5)) as client,
        client.stream("GET", server.url) as response,
    ):
        start = time.monotonic()
        with pytest.raises(httpx2.ReadTimeout):
            await collect(response, got, via=via)
        assert 1.4 < time.monotonic() - start < 3.0
    assert got == b"some"


async def test_read_timeout_counts_a_read_s_wait_not_the_silence_before_it() -> None:
    # 3 s between the two bytes under a 1.5 s read timeout; the reader, busy for 1.8 s itself, then
    # waits only 1.2 s: like httpcore, the timeout bounds each wait for data, not the response's age.
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
    got = bytearray()
    async with (
        Server(respond_with(head + b"a", b"b", gap=3.0)) as server,
        lean_client(httpx2.Timeout(5.0, read=1.5)) as client,
        client.stream("GET", server.url) as response,
    ):
        async for chunk in response.extensions[BODY].body.chunks():
            if not got:
                await asyncio.sleep(1.8)
            got += chunk
    assert got == b"ab"


# --- flow control -----------------------------------------------------------------------------------------


async def test_large_body_read_slowly_arrives_intact_with_bounded_buffering() -> None:
    body = random.Random(7).randbytes(8 * 1024 * 1024)

    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
        writer.write(body)
        await writer.drain()
        return True

    sizes: list[int] = []
    got = bytearray()
    async with Server(respond) as server, lean_client(httpx2.Timeout(5.0, read=2.0)) as client:
        async with client.stream("GET", server.url) as response:
            async for chunk in response.extensions[BODY].body.chunks():
                sizes.append(len(chunk))
                got += chunk
                await asyncio.sleep(0.02)  # far slower than loopback delivers
        assert (await client.get(server.url)).content == body  # and the connection is still good
    assert got == body
    # Reading pauses past 256 KiB buffered; one more socket read (at most 256 KiB) may land on top.
    assert max(sizes) <= 512 * 1024
    assert server.connections == 1


# --- push mode: a body piped to a sink ---------------------------------------------------------------------


async def test_a_piped_body_gets_what_was_buffered_first_then_the_rest_and_the_connection_is_reused() -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    got = bytearray()
    async with (
        Server(respond_with(head + b"3\r\nabc\r\n", b"3\r\ndef\r\n0\r\n\r\n", gap=0.2)) as server,
        lean_client() as client,
    ):
        async with client.stream("GET", server.url) as response:
            await asyncio.sleep(0.1)  # "abc" waits in the body, unread, when the sink comes
            await collect(response, got, via="pipe")
        assert got == b"abcdef"
        assert (await client.get(server.url)).status_code == 200
    assert server.connections == 1


async def test_a_body_that_ended_before_it_was_piped_ends_the_sink_at_once() -> None:
    got = bytearray()
    async with (
        Server(respond_with(length_response(b"whole"))) as server,
        lean_client() as client,
        client.stream("GET", server.url) as response,
    ):
        await asyncio.sleep(0.05)
        await asyncio.wait_for(collect(response, got, via="pipe"), 1.0)
    assert got == b"whole"


async def test_a_throttled_pipe_holds_the_sender_back_without_timing_out() -> None:
    """A sink that cannot pass the body on pauses reading: the sender's writes back up, and the read
    timeout, which is for a silent upstream, rests while the body is held back on purpose."""
    body = random.Random(5).randbytes(8 * 1024 * 1024)
    sent = asyncio.Event()

    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
        writer.write(body)
        await writer.drain()
        sent.set()
        return True

    got = bytearray()
    async with Server(respond) as server, lean_client(httpx2.Timeout(5.0, read=0.5)) as client:
        async with client.stream("GET", server.url) as response:
            piped = response.extensions[BODY].body
            sink = Collector(got)
            sink.on_data = lambda data: piped.throttle(True)
            piped.pipe(sink)
            await asyncio.sleep(1.5)  # three read timeouts
            assert not sent.is_set() and not sink.ended.done()
            held = len(got)
            assert 0 < held < len(body) // 2
            sink.on_data = None
            piped.throttle(False)
            await sink.ended
        assert got == body
        assert (await client.get(server.url)).content == body
    assert server.connections == 1


@pytest.mark.parametrize("arrives", ["before the pipe", "after the pipe"])
async def test_a_body_that_ends_while_throttled_leaves_a_connection_that_reads_again(arrives: str) -> None:
    """The sink throttles on the very piece that ends the body (one that waited in the body, or one
    read with the body's end): the connection goes back to the pool complete, and must not stay paused
    there, or the next request on it would never read its head."""
    gap = 0.0 if arrives == "before the pipe" else 0.2
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"
    async with (
        Server(respond_with(head, b"all of it", gap=gap)) as server,
        lean_client(httpx2.Timeout(5.0, read=1.0)) as client,
    ):
        got = bytearray()
        async with client.stream("GET", server.url) as response:
            piped = response.extensions[BODY].body
            sink = Collector(got)
            sink.on_data = lambda data: piped.throttle(True)
            if arrives == "before the pipe":
                await asyncio.sleep(0.05)  # the whole body waits, unread, in one piece
            piped.pipe(sink)
            await sink.ended
        assert got == b"all of it"
        again = await asyncio.wait_for(client.get(server.url), 2.0)
        assert again.content == b"all of it"
    assert server.connections == 1


async def test_an_unpiped_body_drops_the_rest_and_a_connection_left_mid_body_is_not_reused() -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    got = bytearray()
    async with (
        Server(respond_with(head + b"3\r\nabc\r\n", b"3\r\ndef\r\n", b"0\r\n\r\n", gap=0.3)) as server,
        lean_client() as client,
    ):
        async with client.stream("GET", server.url) as response:
            piped = response.extensions[BODY].body
            sink = Collector(got)
            sink.on_data = lambda data: piped.unpipe()
            piped.pipe(sink)
            await asyncio.sleep(0.45)  # "def" arrived, and went nowhere; the body has not ended
            assert got == b"abc" and not sink.ended.done()
        assert (await client.get(server.url)).status_code == 200
    assert server.connections == 2


# --- the request on the wire ------------------------------------------------------------------------------


async def test_request_bytes_on_the_wire() -> None:
    async def stream_body() -> AsyncIterator[bytes]:
        yield b"streamed "
        yield b"body"

    async with Server(respond_with(length_response(b"ok"))) as server, lean_client() as client:
        await client.post(
            f"{server.url}/v1/things?x=1&y=a%20b", content=b"payload-bytes", headers={"x-custom": "v"}
        )
        await client.put(f"{server.url}/up", content=stream_body())
        await client.get(f"{server.url}/plain")
    post, put, get = server.seen
    host = server.url.removeprefix("http://").encode()
    assert post.line == b"POST /v1/things?x=1&y=a%20b HTTP/1.1"
    assert post.header("host") == host
    assert post.header("content-length") == b"13"
    assert post.header("x-custom") == b"v"
    assert post.body == b"payload-bytes"
    # A streamed request body goes out whole, with a length instead of chunked framing.
    assert put.line == b"PUT /up HTTP/1.1"
    assert put.header("content-length") == b"13"
    assert put.header("transfer-encoding") is None
    assert put.body == b"streamed body"
    assert get.line == b"GET /plain HTTP/1.1"
    assert get.header("host") == host
    assert get.header("content-length") is None


# --- the pool ---------------------------------------------------------------------------------------------


async def test_failed_exchanges_give_their_pool_slot_back() -> None:
    async def respond(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.target == "/hangup":
            return False
        if seen.target == "/reset":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab")
            await asyncio.sleep(0.02)
            reset(writer)
            return False
        if seen.target == "/partial":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab")
            return True
        writer.write(length_response(b"ok"))
        return True

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        refused = probe.getsockname()[1]
    timeout = httpx2.Timeout(5.0, pool=0.5)
    async with Server(respond) as server, lean_client(timeout, max_connections=1) as client:
        with pytest.raises(httpx2.ConnectError):
            await client.get(f"http://127.0.0.1:{refused}/")
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(f"{server.url}/hangup")
        with pytest.raises(httpx2.ReadError):
            await client.get(f"{server.url}/reset")
        async with client.stream("GET", f"{server.url}/partial"):
            pass
        assert (await client.get(f"{server.url}/ok")).content == b"ok"


async def test_pool_limit_waits_then_times_out() -> None:
    async with (
        Server(respond_with(length_response(b"ok"))) as server,
        lean_client(httpx2.Timeout(5.0, pool=0.2), max_connections=1) as client,
    ):
        async with client.stream("GET", server.url) as held:
            with pytest.raises(httpx2.PoolTimeout):
                await client.get(server.url)
            await held.aread()
        assert (await client.get(server.url)).content == b"ok"
    assert server.connections == 1


# --- the SDK against the stand-in -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sdk_on_lean(url: str, max_retries: int = 0) -> AsyncIterator[anthropic.AsyncAnthropic]:
    http = anthropic.DefaultAsyncHttpxClient(transport=LeanTransport())
    client = anthropic.AsyncAnthropic(
        base_url=url, api_key="test-key", max_retries=max_retries, timeout=5.0, http_client=http
    )
    try:
        yield client
    finally:
        await client.close()
        await asyncio.sleep(0.01)


async def test_sdk_streams_and_retries_529_over_the_lean_transport() -> None:
    async with StandInModel() as model, sdk_on_lean(model.url, max_retries=2) as client:
        got: list[str] = []
        async with client.messages.stream(
            model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "Hello there"}]
        ) as stream:
            async for piece in stream.text_stream:
                got.append(piece)
            final = await stream.get_final_message()
        assert "".join(got) == "echo: Hello there [turns=1]"
        assert final.stop_reason == "end_turn"

        async with client.messages.stream(
            model=MODEL,
            max_tokens=100,
            messages=[{"role": "user", "content": "hi @@status=529 @@fail_attempts=1 @@retry_after=0.01"}],
        ) as stream:
            retried = await stream.get_final_message()
        assert retried.content[0].type == "text"
        assert retried.content[0].text == "echo: hi [turns=1]"
        assert [r.headers["x-stainless-retry-count"] for r in model.requests[1:]] == ["0", "1"]


async def test_sdk_raw_stream_read_through_body() -> None:
    # The relay's path: a streaming create, its SSE bytes read from `extensions[BODY]`.
    async with StandInModel() as model, sdk_on_lean(model.url) as client:
        async with client.messages.with_streaming_response.create(
            model=MODEL,
            max_tokens=100,
            messages=[{"role": "user", "content": "one two @@unicode"}],
            stream=True,
        ) as response:
            raw = await read_body(response.http_response)
        await until(lambda: model.streams_completed == 1)
    text = raw.decode()
    assert text.startswith("event: message_start")
    assert "héllo" in text and "世界" in text
    assert text.rstrip().endswith('data: {"type":"message_stop"}')
