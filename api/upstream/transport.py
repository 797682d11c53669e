"""A lean HTTP/1.1 transport for the SDK's httpx2 client: raw asyncio protocols, a pool that never polls.

The SDK still builds, authenticates and retries every request and turns every error status into its
own exception; this only moves the bytes. httpcore's pool checks every idle connection's socket on
each request and each close (a cost that grows with the number of streams), and its body reads go
through anyio cancel scopes and h11 per chunk. Here a connection learns it was closed from the event
loop, a body chunk costs one callback, and a relay can read the body straight from
`response.extensions[BODY]` without httpx's per-chunk layers. Responses are parsed by httptools
(llhttp, the parser uvicorn and Node use), never by hand. What it buys, measured against httpx's own
transport, is in docs/hand-written-parts.md.

Errors are httpx2's own types, raised where httpcore would raise them, so the SDK retries exactly
what it retried before and `api.upstream.client` maps mid-stream failures as before.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Protocol, cast

import httptools
import httpx2

BODY = "chat_api.body"  # the response extension holding its `BodyStream`, for readers that skip httpx
_MAX_HEAD = 64 * 1024
_HIGH_WATER = 256 * 1024  # buffered body bytes at which reading pauses until the reader catches up
_UNBOUNDED = 1_000_000
# httpx's own defaults: at most 100 connections, 20 of them kept idle, for 5 s.
DEFAULT_LIMITS = httpx2.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)


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


class _Unexpected(Exception):
    """A second response where only one was asked for."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, one exchange at a time; httptools (llhttp) parses what comes back."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request: httpx2.Request | None) -> None:
        self.loop = loop
        # Only until the response head: then httpx attaches the request to any later error itself,
        # and an open stream does not keep the request (its headers, its whole payload) alive.
        self.request: httpx2.Request | None = request
        self._head_only = False
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        self.idle_since = 0.0
        self.read_timeout: float | None = None
        self.last_read = 0.0
        self.waiting: Body | None = None  # a body read blocked on this connection, for the watchdog
        self._paused = False
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[tuple[int, bytes, list[tuple[bytes, bytes]]]] | None = None
        self._head_bytes = 0  # of the response head so far, which llhttp does not bound
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: Body | None = None
        self._until_close = False  # a body with neither a length nor chunks: it ends when the server closes
        self._answered = False  # this exchange's response is whole

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        if self._head is None and self._body is None:
            self.abort()  # bytes nobody asked for: the connection is not in a state to reuse
            return
        try:
            self._parser.feed_data(data)
            if self._body is None:
                self._head_bytes += len(data)
                if self._head_bytes > _MAX_HEAD:
                    self._fail(httpx2.RemoteProtocolError("response head too large", request=self.request))
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Unexpected):
                self.abort()  # the response was whole; what followed it makes the connection unfit
            else:
                raise
        except httptools.HttpParserError as exc:
            reason = str(exc) or type(exc).__name__
            self._fail(httpx2.RemoteProtocolError(f"malformed response: {reason}", request=self.request))

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
            if self._until_close and exc is None:
                body.finish()
            elif exc is not None:
                body.fail(httpx2.ReadError(str(exc), request=self.request))
            else:
                body.fail(
                    httpx2.RemoteProtocolError(
                        "peer closed connection without sending complete message body", request=self.request
                    )
                )

    # httptools' callbacks

    def on_message_begin(self) -> None:
        if self._answered:
            raise _Unexpected
        self._reason, self._headers = b"", []

    def on_status(self, status: bytes) -> None:
        self._reason += status  # llhttp hands over a reason split across reads in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        headers, self._headers = self._headers, []
        if status < 200:  # an interim 1xx response: the real one follows
            return
        self._body = Body(self)
        self.reusable = self._parser.should_keep_alive()
        names = {name.lower() for name, _ in headers}
        self._until_close = (
            status not in (204, 304) and b"content-length" not in names and b"transfer-encoding" not in names
        )
        if self._until_close:
            self.reusable = False
        head_only = self._head_only
        self.request = None
        if self._head is not None and not self._head.done():
            self._head.set_result((status, self._reason, headers))
        if head_only:
            # A HEAD's response has no body whatever its length says, which llhttp cannot be told:
            # the body ends here, and the parser, left waiting for it, goes with its connection.
            self._until_close = self.reusable = False
            self._answered = True
            self._body.finish()

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body.feed(body)

    def on_message_complete(self) -> None:
        body = self._body
        if body is None:  # the end of an interim response
            return
        self._answered = True
        self.reusable = self.reusable and self._parser.should_keep_alive()
        body.finish()
        # The message is whole, whatever its reader held back: read again, so that an idle connection
        # hears its server close it, and the next response on it is read at all.
        self.resume()

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
        self, head: bytes, payload: bytes, request: httpx2.Request | None, head_only: bool
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        assert self.transport is not None
        self.request = request
        self._head_only = head_only
        self.reusable = False
        self._head = self.loop.create_future()
        self._head_bytes = 0
        self._body = None
        self._answered = False
        self.last_read = time.monotonic()
        try:
            self.transport.write(head + payload)
        except (OSError, RuntimeError) as exc:
            raise httpx2.WriteError(str(exc), request=request) from exc
        try:
            return await self._head
        finally:
            self._head = None  # its result (the headers) is the caller's now

    def _fail(self, error: Exception) -> None:
        """A response that cannot be read: its head's waiter or its body's reader gets `error`."""
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        elif self._body is not None:
            self._body.fail(error)
        self.abort()

    def abort(self) -> None:
        self.reusable = False
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


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
    """Takes the options `httpx2.AsyncHTTPTransport` takes for TLS and pooling, since an
    `httpx2.AsyncClient` given a `transport=` ignores its own `verify`, `cert` and `limits`."""

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | bool = True,
        cert: tuple[str, str] | str | None = None,
        trust_env: bool = True,
        limits: httpx2.Limits = DEFAULT_LIMITS,
    ) -> None:
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._limit = asyncio.Semaphore(limits.max_connections or _UNBOUNDED)
        self._max_idle = limits.max_keepalive_connections
        self._keepalive = limits.keepalive_expiry
        self._verify = verify
        self._cert = cert
        self._trust_env = trust_env
        self._ssl: ssl.SSLContext | None = None  # made at the first https request: it reads CA files
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
        head = _request_head(request, len(payload))
        status, reason, headers, stream = await self.send(
            key, head, payload, timeouts, request, head_only=request.method == "HEAD"
        )
        extensions: dict[str, object] = {"http_version": b"HTTP/1.1", "reason_phrase": reason}
        # `Body` hands out the bytes as sent, so a compressed body (the API gzips event streams for
        # the SDK's `accept-encoding: gzip`) is left to httpx, which decodes it.
        if not any(
            name.lower() == b"content-encoding" and value.lower() != b"identity" for name, value in headers
        ):
            extensions[BODY] = stream
        return httpx2.Response(status, headers=headers, stream=stream, extensions=extensions)

    async def send(
        self,
        key: tuple[str, str, int],
        head: bytes,
        payload: bytes,
        timeouts: Mapping[str, float | None],
        request: httpx2.Request | None = None,
        *,
        head_only: bool = False,
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]], BodyStream]:
        """Send a request whose head is already made (`head` ends with its blank line) on a pooled
        connection to `key` (scheme, host, port), and return the response's status, reason, headers
        and body once its head arrived. Errors are httpx2's, carrying `request` when given."""
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
            status, reason, headers = await conn.exchange(head, payload, request, head_only)
        except BaseException:
            if conn is not None:
                self._active.discard(conn)
                conn.abort()
            self._limit.release()
            raise
        body = conn._body
        assert body is not None
        return status, reason, headers, BodyStream(self, key, conn, body)

    def _idle_connection(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and not self._expired(conn, now):
                return conn
            conn.abort()
        return None

    def _expired(self, conn: _Connection, now: float) -> bool:
        return self._keepalive is not None and now - conn.idle_since >= self._keepalive

    def _prune(self) -> None:
        """Close idle connections past their keep-alive expiry or closed by their server: a burst's
        connections are reclaimed once it is over, not only when a later request finds them."""
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            for conn in [c for c in idle if c.closed or self._expired(c, now)]:
                idle.remove(conn)
                conn.abort()
            if not idle:
                del self._idle[key]

    @property
    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def _connect(
        self, key: tuple[str, str, int], request: httpx2.Request | None, connect_timeout: float | None
    ) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = httpx2.create_ssl_context(
                    verify=self._verify, cert=self._cert, trust_env=self._trust_env
                )
                self._ssl.set_alpn_protocols(["http/1.1"])
            context = self._ssl
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
        if (
            complete
            and conn.reusable
            and not conn.closed
            and (self._max_idle is None or self.idle_connections < self._max_idle)
        ):
            conn.idle_since = time.monotonic()
            conn._body = None
            self._idle.setdefault(key, deque()).append(conn)
            self._ensure_watchdog()
        else:
            conn.abort()  # a body not read to its end leaves the connection mid-message

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Fail reads that waited longer than their read timeout, and close expired idle connections:
        one sweep a second for all streams, instead of a timer armed and cancelled on every read of
        every stream. It stops once there is nothing left to watch."""
        while self._active or self._idle:
            await asyncio.sleep(1.0)
            self._prune()
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
