"""uvicorn's httptools protocol, which also tells a running turn the moment its client has gone, and
lets it write the reply's chunks straight to the client.

ASGI's only news of a disconnect is a `receive()` that returns `http.disconnect`, so an app that must
stop work when its client leaves keeps a task waiting in `receive()` for the whole response. For a
relay that is a task, three coroutines and a future held by every open stream, for an event that
the server itself sees directly in `connection_lost`. This protocol marks each request's scope with
`ON_DISCONNECT`; an app that finds the mark puts a callback there, and the protocol calls it when
the connection is lost before the response completed.

Likewise ASGI's only way to write is `await send(...)`: a coroutine, a message dict and, for a
relay, a task woken for every delta of every stream. The scope's `CLIENT_WRITER` is a
`ClientWriter`, which writes a started response's chunks to the transport from any callback, and
tells its user when the client stops (and starts again) taking what is written.

A request the parser itself refuses never reaches the app; it is answered here, in the API's error
shape rather than uvicorn's plain text.

Apps that find neither mark (another server, an in-process test client) wait in `receive()` and
`send()` as usual, which still works the same.

Opt-in (`CHAT_HTTP_PROTOCOL=chat`): measured against uvicorn's own protocol it saved 5 to 10% of CPU
per delta and 14% of memory per stream, short of the 15% a hand-written part must buy to be the
default (docs/hand-written-parts.md). It uses uvicorn's private names, hence the pin on uvicorn and
tests/test_uvicorn_canary.py.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Callable, MutableMapping
from typing import Any, Literal

from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from api.errors import error_body

# The scope key: None until the app registers its callback, CLIENT_GONE once the client left before it
# did; absent under any other server.
ON_DISCONNECT = "chat_api.on_disconnect"
CLIENT_GONE = "gone"

DisconnectHook = Callable[[], None]

# The scope key of the request's `ClientWriter`; absent under any other server.
CLIENT_WRITER = "chat_api.client_writer"


def watch_disconnect(scope: MutableMapping[str, Any], hook: DisconnectHook) -> bool:
    """Have the server call `hook` when the client leaves (at once if it already has); False when
    this server cannot, and the app must wait in `receive()` instead."""
    if ON_DISCONNECT not in scope:
        return False
    if scope[ON_DISCONNECT] == CLIENT_GONE:
        hook()
    else:
        scope[ON_DISCONNECT] = hook
    return True


def unwatch_disconnect(scope: MutableMapping[str, Any]) -> None:
    if callable(scope.get(ON_DISCONNECT)):
        scope[ON_DISCONNECT] = None


class LeanEvent(asyncio.Event):
    """An `asyncio.Event` that makes its waiters' deque (some 600 bytes) only once someone waits.

    uvicorn makes two events for every open stream, one per connection and one per request, and
    almost never waits on either: for a relay that is a tenth of the memory a stream holds.
    """

    # Until someone waits an empty tuple stands in for the deque: set() iterates it and finds nobody.
    _waiters: collections.deque[asyncio.Future[Any]] = ()  # type: ignore[assignment]

    def __init__(self) -> None:
        self._value = False

    async def wait(self) -> Literal[True]:
        if not self._value and not isinstance(self._waiters, collections.deque):
            self._waiters = collections.deque()
        return await super().wait()


class _Pipeline(list[Any]):
    """uvicorn's queue of requests pipelined behind the one in flight (it takes from the right):
    a list, which allocates nothing while empty, where a deque allocates a block at once."""

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


class WatchedFlow(FlowControl):
    """uvicorn's flow control, which also tells a `ClientWriter`'s user when writing pauses."""

    on_paused: Callable[[bool], None] | None = None

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__(transport)
        self._is_writable_event = LeanEvent()
        self._is_writable_event.set()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.on_paused is not None:
            self.on_paused(True)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.on_paused is not None:
            self.on_paused(False)


class ClientWriter:
    """Writes the body chunks of a response already started through ASGI (chunked, as uvicorn
    frames a response without a length), with uvicorn's `send` left out: for a relay, whose chunks
    come from a callback rather than a task."""

    __slots__ = ("_flow", "_transport")

    def __init__(self, transport: asyncio.Transport, flow: WatchedFlow) -> None:
        self._transport = transport
        self._flow = flow

    def write(self, chunk: bytes) -> None:
        """Write one chunk now; dropped once the client has gone (its turn is told separately)."""
        if not self._transport.is_closing():
            self._transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))

    def watch(self, on_paused: Callable[[bool], None] | None) -> None:
        """Have `on_paused(True)` called when the client's buffer is full, and `(False)` once it has
        drained; None to stop. While paused, written chunks wait in the buffer."""
        self._flow.on_paused = on_paused
        if on_paused is not None and self._flow.write_paused:
            on_paused(True)


class _ClientConnection:
    """What the protocol keeps of its own per connection, in one attribute: past a few more
    attributes uvicorn's protocol objects stop sharing their dict's keys, and one attribute more cost
    every open stream 1.3 KiB (measured)."""

    __slots__ = ("answering", "writer")

    def __init__(self, writer: ClientWriter) -> None:
        self.writer = writer
        # The request whose response is being written. uvicorn's `cycle` is the newest request,
        # which with HTTP pipelining is one queued behind it.
        self.answering: RequestResponseCycle | None = None


_MALFORMED = error_body(
    "invalid_request",
    "the request is not valid HTTP/1.1 (a control character in a header, or a byte outside ASCII "
    "in the request line); the connection is closed",
)


class JsonErrorProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, as it is but for the one answer it writes itself."""

    def send_400_response(self, msg: str) -> None:
        """What the parser refuses (a request that breaks HTTP/1.1's grammar: CR, NUL or another
        control character in a header, raw non-ASCII in the request line, a bad Content-Length...) is
        answered in the API's error shape, with a request id like every response, and then closed:
        the parser stops at the first such byte, so where the next request begins is unknown."""
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head.extend(b"%s: %s\r\n" % pair for pair in self.server_state.default_headers)
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nx-request-id: %s\r\n"
            b"connection: close\r\n\r\n" % (len(_MALFORMED), uuid.uuid4().hex.encode())
        )
        self.transport.write(b"".join(head) + _MALFORMED)
        self.transport.close()


class ChatHttpProtocol(JsonErrorProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = WatchedFlow(transport)
        self._chat = _ClientConnection(ClientWriter(transport, self.flow))
        if isinstance(self.pipeline, collections.deque) and not self.pipeline:
            self.pipeline = _Pipeline()  # type: ignore[assignment]

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        # The app's task was only created above; it has not run yet, so it will find the mark. The
        # mark is made only where uvicorn's cycle looks as this relies on; otherwise (another
        # uvicorn release) the app waits in `receive()`, which costs memory but nothing else.
        cycle = getattr(self, "cycle", None)
        if (
            cycle is not None
            and getattr(cycle, "scope", None) is self.scope
            and isinstance(getattr(cycle, "disconnected", None), bool)
            and "path" in self.scope
        ):
            self.scope[ON_DISCONNECT] = None
            # Only uvicorn's own callbacks, which run after this, have seen the cycle's event yet.
            if type(cycle.message_event) is asyncio.Event and not cycle.message_event.is_set():
                cycle.message_event = LeanEvent()
            if cycle.flow is self.flow and getattr(cycle, "chunked_encoding", False) is None:
                self.scope[CLIENT_WRITER] = self._chat.writer

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._chat.answering = cycle
        super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        self._chat.answering = None  # responses end in order; the next one queued, if any, starts now
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        cycle, answering = self.cycle, self._chat.answering
        super().connection_lost(exc)
        # uvicorn tells only its newest request that the client left, and only while its response
        # is incomplete; the one being answered, with others queued behind it, must hear it too.
        if answering is not None and answering is not cycle and not answering.response_complete:
            answering.disconnected = True
            answering.message_event.set()
            _client_gone(answering)
        if cycle is not None and cycle.disconnected:
            _client_gone(cycle)


def _client_gone(cycle: RequestResponseCycle) -> None:
    if ON_DISCONNECT not in cycle.scope:
        return
    hook = cycle.scope[ON_DISCONNECT]  # type: ignore[literal-required]
    cycle.scope[ON_DISCONNECT] = CLIENT_GONE  # type: ignore[literal-required]
    if callable(hook):
        hook()
