"""A lean HTTP/1.1 transport for the SDK's httpx2 client: raw asyncio protocols, a pool that never polls.

The SDK still builds, authenticates and retries every request and turns every error status into its
own exception; this only moves the bytes. httpcore's pool checks every idle connection's socket on
each request and each close (a cost that grows with the number of streams), and its body reads go
through anyio cancel scopes and h11 per chunk. Here a connection learns it was closed from the event
loop, a body chunk costs one callback, and a relay can read the body straight from
`response.extensions[BODY]` without httpx's per-chunk layers.

Errors are httpx2's own types, raised where httpcore would raise them, so the SDK retries exactly
what it retried before and `api.upstream.client` maps mid-stream failures as before.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol, cast

import httpx2

BODY = "chat_api.body"  # the response extension holding its `BodyStream`, for readers that skip httpx
_MAX_HEAD = 64 * 1024
_HIGH_WATER = 256 * 1024  # buffered body bytes at which reading pauses until the reader catches up
_KEEPALIVE_SECONDS = 5.0  # the same idle expiry as httpx's default


class BodySink(Protocol):
    """Takes a body in push mode (`Body.pipe`): called from the connection's own callbacks."""

    def body_data(self, data: bytes) -> None: ...

    def body_end(self, error: Exception | None) -> None:
        """The body ended: whole (None), or with the error a reader would have raised."""
        ...


class Body:
    """A response body as it arrives: pieces in, one joined chunk out per read; or, once piped, each
    piece handed to a sink as it arrives."""

    __slots__ = ("_conn", "_error", "_pieces", "_sink", "_size", "_waiter", "done")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._pieces: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._sink: BodySink | None = None
        self.done = False

    def feed(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.body_data(data)
            return
        self._pieces.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER:
            self._conn.pause()
        self._wake()

    def finish(self) -> None:
        self.done = True
        if self._sink is not None:
            self._end(None)
        else:
            self._wake()

    def fail(self, error: Exception) -> None:
        if not self.done:
            self._error = error
            if self._sink is not None:
                self._end(error)
            else:
                self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """The bytes that arrived since the last read, waiting for some; b"" at the end of the body."""
        conn = self._conn
        while True:
            if self._pieces:
                pieces = self._pieces
                data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                self._pieces = []
                self._size = 0
                conn.resume()
                return data
            if self._error is not None:
                raise self._error
            if self.done:
                return b""
            self._waiter = conn.loop.create_future()
            conn.waiting = self
            conn.last_read = time.monotonic()  # the read timeout counts from here
            try:
                await self._waiter
            finally:
                self._waiter = None
                conn.waiting = None

    async def chunks(self) -> AsyncIterator[bytes]:
        while data := await self.read():
            yield data

    def pipe(self, sink: BodySink) -> None:
        """Push mode, for good: from now on each piece goes to `sink` from the connection's data
        callback as it arrives, with no reader task woken in between. What was buffered goes first.
        The read timeout covers the silence between pieces, except while `throttle`d."""
        self._sink = sink
        conn = self._conn
        # Armed first: the sink may throttle the body while it takes what was buffered.
        conn.waiting = self
        conn.last_read = time.monotonic()
        if self._pieces:
            pieces, self._pieces, self._size = self._pieces, [], 0
            conn.resume()
            sink.body_data(b"".join(pieces))
        if self._sink is not sink:  # the sink let go while taking what was buffered
            return
        if self._error is not None:
            self._end(self._error)
        elif self.done:
            self._end(None)

    def throttle(self, paused: bool) -> None:
        """Stop (or start again) reading a piped body while its sink cannot pass it on. A body held
        back on purpose is not a silent upstream, so the read timeout rests meanwhile. A body already
        whole has nothing left to hold back: its connection keeps reading, ready for reuse."""
        if self._sink is None or self._sink is _DROP or self.done:
            return
        conn = self._conn
        if paused:
            conn.waiting = None
            conn.pause()
        else:
            conn.waiting = self
            conn.last_read = time.monotonic()
            conn.resume()

    def unpipe(self) -> None:
        """The sink hears nothing more: what still arrives is dropped, and a body not read to its end
        leaves its connection unfit for reuse when it is closed."""
        if self._sink is not None:
            self._sink = _DROP
            self._conn.waiting = None

    def _end(self, error: Exception | None) -> None:
        sink = self._sink
        self._sink = _DROP
        self._conn.waiting = None
        if sink is not None:
            sink.body_end(error)


class _Dropped:
    """The sink of a body whose sink let go, or that ended."""

    def body_data(self, data: bytes) -> None:
        pass

    def body_end(self, error: Exception | None) -> None:
        pass


_DROP = _Dropped()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request: httpx2.Request) -> None:
        self.loop = loop
        # Only until the response head: then httpx attaches the request to any later error itself,
        # and an open stream does not keep the request (its headers, its whole payload) alive.
        self.request: httpx2.Request | None = request
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        self.idle_since = 0.0
        self.read_timeout: float | None = None
        self.last_read = 0.0
        self.waiting: Body | None = None  # a body read blocked on this connection, for the watchdog
        self._paused = False
        self._head: asyncio.Future[tuple[int, bytes, list[tuple[bytes, bytes]]]] | None = None
        self._buf = b""
        self._body: Body | None = None
        self._left = 0  # content-length bytes still to come, or of the current chunk
        self._mode = ""  # "length", "chunked" or "close" while a body is read
        self._chunk_state = 0  # 0 size line, 1 payload, 2 the payload's CRLF, 3 trailers

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        if self._body is not None:
            self._read_body(data)
            return
        if self._head is None or self._head.done():
            self.abort()  # bytes nobody asked for: the connection is not in a state to reuse
            return
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_HEAD:
                self._fail_head(httpx2.RemoteProtocolError("response head too large", request=self.request))
            return
        head, rest = self._buf[:end], self._buf[end + 4 :]
        self._buf = b""
        try:
            status, reason, headers = _parse_head(head)
        except ValueError as exc:
            self._fail_head(
                httpx2.RemoteProtocolError(f"malformed response head: {exc}", request=self.request)
            )
            return
        if status < 200:  # an interim 1xx response: the real one follows
            self._buf = rest
            if rest:
                self.data_received(b"")
            return
        self._start_body(status, headers)
        self.request = None
        self._head.set_result((status, reason, headers))
        if rest:
            self._read_body(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._head is not None and not self._head.done():
            error: Exception = (
                httpx2.ReadError(str(exc), request=self.request)
                if exc is not None
                else httpx2.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=self.request
                )
            )
            self._head.set_exception(error)
        body = self._body
        if body is not None and not body.done:
            if self._mode == "close" and exc is None:
                body.finish()
            elif exc is not None:
                body.fail(httpx2.ReadError(str(exc), request=self.request))
            else:
                body.fail(
                    httpx2.RemoteProtocolError(
                        "peer closed connection without sending complete message body", request=self.request
                    )
                )

    # flow control, driven by the body's reader

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    # one exchange

    async def exchange(
        self, request: httpx2.Request, payload: bytes
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        assert self.transport is not None
        self.request = request
        self.reusable = False
        self._head = self.loop.create_future()
        self._body = None
        self.last_read = time.monotonic()
        try:
            self.transport.write(_request_head(request, len(payload)) + payload)
        except (OSError, RuntimeError) as exc:
            raise httpx2.WriteError(str(exc), request=request) from exc
        try:
            return await self._head
        finally:
            self._head = None  # its result (the headers) is the caller's now

    def _start_body(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._body = Body(self)
        length: int | None = None
        chunked = False
        close = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lower == b"connection":
                close = b"close" in value.lower()
        self.reusable = not close
        if status in (204, 304) or (self.request is not None and self.request.method == "HEAD"):
            chunked, length = False, 0
        if chunked:
            self._mode, self._chunk_state = "chunked", 0
        elif length is not None:
            self._mode, self._left = "length", length
            if length == 0:
                self._end_body()
        else:
            self._mode, self.reusable = "close", False

    def _read_body(self, data: bytes) -> None:
        body = self._body
        assert body is not None
        if body.done:
            if data:
                self.reusable = False
                self.abort()
            return
        if self._mode == "length":
            if len(data) >= self._left:
                if self._left:
                    body.feed(data[: self._left])
                extra = len(data) > self._left
                self._left = 0
                self._end_body()
                if extra:
                    self.reusable = False
            else:
                self._left -= len(data)
                body.feed(data)
        elif self._mode == "chunked":
            self._read_chunked(self._buf + data if self._buf else data)
        else:
            body.feed(data)

    def _read_chunked(self, buf: bytes) -> None:
        body = self._body
        assert body is not None
        pos, size = 0, len(buf)
        while pos < size:
            state = self._chunk_state
            if state == 1:  # payload
                take = min(self._left, size - pos)
                body.feed(buf if take == size else buf[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._chunk_state = 2
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            line = buf[pos:end]
            pos = end + 2
            if state == 0:
                try:
                    self._left = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    self._protocol_error("malformed chunk size")
                    return
                self._chunk_state = 1 if self._left else 3
            elif state == 2:
                if line:
                    self._protocol_error("chunk not followed by CRLF")
                    return
                self._chunk_state = 0
            elif not line:  # the empty line after the last chunk (and any trailers)
                self._buf = b""
                self._end_body()
                if pos < size:
                    self.reusable = False
                return
        self._buf = buf[pos:]

    def _end_body(self) -> None:
        assert self._body is not None
        self._mode = ""
        self._body.finish()
        # The message is whole, whatever its reader held back: read again, so that an idle connection
        # hears its server close it, and the next response on it is read at all.
        self.resume()

    def _protocol_error(self, message: str) -> None:
        if self._body is not None:
            self._body.fail(httpx2.RemoteProtocolError(message, request=self.request))
        self.abort()

    def _fail_head(self, error: Exception) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self.abort()

    def abort(self) -> None:
        self.reusable = False
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if not version.startswith(b"HTTP/1."):
        raise ValueError("not an HTTP/1.x status line")
    code, _, reason = rest.partition(b" ")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError("header line without a colon")
        headers.append((name.strip(), value.strip()))
    return int(code), reason, headers


def _request_head(request: httpx2.Request, length: int) -> bytes:
    url = request.url
    target = url.raw_path
    lines = [b"%b %b HTTP/1.1" % (request.method.encode(), target)]
    has_length = False
    for name, value in request.headers.raw:
        lower = name.lower()
        if lower == b"content-length":
            has_length = True
        elif lower == b"transfer-encoding":
            continue  # the body is sent whole, with a length
        lines.append(name + b": " + value)
    if not has_length and (length or request.method in ("POST", "PUT", "PATCH")):
        lines.append(b"content-length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class BodyStream(httpx2.AsyncByteStream):
    """The body as httpx sees it; closing it hands the connection back to the pool when that is safe."""

    def __init__(self, pool: LeanTransport, key: tuple[str, str, int], conn: _Connection, body: Body) -> None:
        self._pool = pool
        self._key = key
        self._conn = conn
        self.body = body
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.body.chunks():
            yield chunk

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool._release(self._key, self._conn, self.body.done)

    def close(self) -> None:
        """`aclose` for a caller outside httpx: nothing in it waits."""
        if not self._closed:
            self._closed = True
            self._pool._release(self._key, self._conn, self.body.done)


class LeanTransport(httpx2.AsyncBaseTransport):
    def __init__(self, *, max_connections: int = 10_000, ssl_context: ssl.SSLContext | None = None) -> None:
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._limit = asyncio.Semaphore(max_connections)
        self._ssl = ssl_context
        self._active: set[_Connection] = set()
        self._watchdog: asyncio.Task[None] | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx2.UnsupportedProtocol(f"unsupported scheme {scheme!r}", request=request)
        key = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        payload = await request.aread()
        if self._limit.locked():  # only then is there a wait to bound (asyncio.timeout: no task per request)
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await self._limit.acquire()
            except TimeoutError as exc:
                raise httpx2.PoolTimeout("no upstream connection free in time", request=request) from exc
        else:
            await self._limit.acquire()
        conn: _Connection | None = None
        try:
            conn = self._idle_connection(key) or await self._connect(key, request, timeouts.get("connect"))
            conn.read_timeout = timeouts.get("read")
            self._active.add(conn)
            self._ensure_watchdog()
            status, reason, headers = await conn.exchange(request, payload)
        except BaseException:
            if conn is not None:
                self._active.discard(conn)
                conn.abort()
            self._limit.release()
            raise
        body = conn._body
        assert body is not None
        stream = BodyStream(self, key, conn, body)
        extensions: dict[str, object] = {"http_version": b"HTTP/1.1", "reason_phrase": reason}
        # `Body` hands out the bytes as sent, so a compressed body (the API gzips event streams for
        # the SDK's `accept-encoding: gzip`) is left to httpx, which decodes it.
        if not any(
            name.lower() == b"content-encoding" and value.lower() != b"identity" for name, value in headers
        ):
            extensions[BODY] = stream
        return httpx2.Response(status, headers=headers, stream=stream, extensions=extensions)

    def _idle_connection(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < _KEEPALIVE_SECONDS:
                return conn
            conn.abort()
        return None

    async def _connect(
        self, key: tuple[str, str, int], request: httpx2.Request, connect_timeout: float | None
    ) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        context = None
        if scheme == "https":
            context = self._ssl or _default_ssl_context()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(loop, request),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context else None,
                ),
                connect_timeout,
            )
        except TimeoutError as exc:
            raise httpx2.ConnectTimeout(f"connecting to {host}:{port} timed out", request=request) from exc
        except OSError as exc:
            raise httpx2.ConnectError(str(exc), request=request) from exc
        return protocol

    def _release(self, key: tuple[str, str, int], conn: _Connection, complete: bool) -> None:
        self._active.discard(conn)
        self._limit.release()
        if complete and conn.reusable and not conn.closed:
            conn.idle_since = time.monotonic()
            conn._body = None
            self._idle.setdefault(key, deque()).append(conn)
        else:
            conn.abort()  # a body not read to its end leaves the connection mid-message

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Fail reads that waited longer than their read timeout: one sweep a second for all streams,
        instead of a timer armed and cancelled on every read of every stream."""
        while self._active:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in list(self._active):
                timeout = conn.read_timeout
                if timeout is None or now - conn.last_read <= timeout:
                    continue
                error = httpx2.ReadTimeout(
                    "the upstream sent nothing within the read timeout", request=conn.request
                )
                if conn._head is not None and not conn._head.done():
                    conn._head.set_exception(error)
                elif conn.waiting is not None:
                    conn.waiting.fail(error)
                else:
                    continue
                self._active.discard(conn)
                conn.abort()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
        for conn in list(self._active):
            conn.abort()
        if self._watchdog is not None:
            self._watchdog.cancel()


_SSL: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    global _SSL
    if _SSL is None:
        _SSL = httpx2.create_ssl_context()
        _SSL.set_alpn_protocols(["http/1.1"])
    return _SSL
