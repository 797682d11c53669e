"""The server protocol that tells a turn its client left, without a task waiting in `receive()`."""

from __future__ import annotations

import asyncio
import collections
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from api.dev.standin import StandInModel
from api.http.protocol import (
    CLIENT_GONE,
    ON_DISCONNECT,
    ChatHttpProtocol,
    LeanEvent,
    unwatch_disconnect,
    watch_disconnect,
)
from api.outcomes import Outcome, TurnReport
from api.turn.service import Hold, Turn
from tests.conftest import LiveApp
from tests.processes import wait_until


def test_a_scope_without_the_mark_needs_a_watcher() -> None:
    assert watch_disconnect({"type": "http"}, lambda: None) is False


def test_the_hook_is_registered_and_taken_back() -> None:
    scope: dict[str, Any] = {ON_DISCONNECT: None}
    calls: list[int] = []
    assert watch_disconnect(scope, lambda: calls.append(1)) is True
    assert callable(scope[ON_DISCONNECT]) and calls == []
    unwatch_disconnect(scope)
    assert scope[ON_DISCONNECT] is None


def test_a_client_that_left_before_the_hook_was_registered_is_reported_at_once() -> None:
    calls: list[int] = []
    assert watch_disconnect({ON_DISCONNECT: CLIENT_GONE}, lambda: calls.append(1)) is True
    assert calls == [1]


@pytest.fixture
def open_streams(standin: StandInModel) -> Iterator[Callable[[LiveApp, int], list[socket.socket]]]:
    """Opens `n` slow one-shot streams on raw sockets and waits until each has its first text."""
    opened: list[socket.socket] = []

    def start(app: LiveApp, n: int) -> list[socket.socket]:
        for _ in range(n):
            sock = app.send_chat("/chat/stream", "@@deltas=100 @@delay=0.1")
            opened.append(sock)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        return opened[-n:]

    yield start
    for sock in opened:
        sock.close()


@pytest.mark.parametrize(("http", "per_stream"), [(ChatHttpProtocol, 1), ("httptools", 2)])
def test_an_open_stream_costs_one_task_under_the_chat_protocol(
    live_app: Callable[..., LiveApp],
    open_streams: Callable[[LiveApp, int], list[socket.socket]],
    http: Any,
    per_stream: int,
) -> None:
    app = live_app(http)
    assert app.chat(None, "warm").status_code == 200  # the pool's watchdog and the like exist now
    one = open_streams(app, 1)
    with_one = app.server.tasks()
    open_streams(app, 5)
    # Each further stream adds its request's own task, and under plain httptools a watcher too.
    assert app.server.tasks() - with_one == 5 * per_stream
    one[0].close()
    reports = app.wait_reports(2)
    assert reports[1].outcome is Outcome.CLIENT_DISCONNECTED_WHILE_STREAMING


def test_a_client_gone_before_the_turn_registered_is_seen(
    live_app: Callable[..., LiveApp], standin: StandInModel
) -> None:
    """A client that leaves right after its request, before the turn has begun, still ends the turn."""
    app = live_app()
    app.send_chat("/chat/stream", "@@first_delay=3").close()
    reports = app.wait_reports(1, timeout=2.5)  # well before the reply's first text at 3 s
    assert reports[0].outcome is Outcome.CLIENT_DISCONNECTED_BEFORE_STREAMING
    wait_until(lambda: standin.active_streams == 0, 2.0, "the upstream stream to be closed")


# --- the per-stream objects the protocol makes lean ---------------------------------------------------------


@pytest.mark.anyio
async def test_a_lean_event_behaves_as_asyncio_s() -> None:
    event = LeanEvent()
    assert not event.is_set()
    woken: list[int] = []

    async def waiter(n: int) -> None:
        assert await event.wait() is True
        woken.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    assert woken == []
    event.set()
    await asyncio.gather(*tasks)
    assert sorted(woken) == [0, 1, 2]
    assert await asyncio.wait_for(event.wait(), 0.1) is True  # already set: at once
    event.clear()
    late = asyncio.create_task(event.wait())
    await asyncio.sleep(0.01)
    assert not late.done()
    event.set()
    assert await asyncio.wait_for(late, 0.1) is True


@pytest.mark.anyio
async def test_a_lean_event_allocates_for_waiters_only_once_someone_waits() -> None:
    event = LeanEvent()
    event.set()
    event.clear()
    event.set()
    assert "_waiters" not in vars(event)  # nothing per event until a wait
    event.clear()
    waiting = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    assert isinstance(vars(event)["_waiters"], collections.deque)
    event.set()
    await waiting


def test_requests_pipelined_on_one_connection_are_answered_in_order(live_app: Callable[..., LiveApp]) -> None:
    """uvicorn queues a request sent before the previous response ended; that queue is ours now."""
    app = live_app()
    host, port = app.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-request-id: first\r\n\r\n"
            b"GET /nowhere HTTP/1.1\r\nhost: x\r\nx-request-id: second\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-request-id: third\r\n\r\n"
        )
        data = b""
        while data.count(b"HTTP/1.1 ") < 3 or not data.endswith(b"}"):
            part = sock.recv(65536)
            assert part
            data += part
    # Each status line follows the previous body directly.
    assert re.findall(rb"HTTP/1\.1 (\d{3})", data) == [b"200", b"404", b"200"]
    assert re.findall(rb"x-request-id: (\w+)", data) == [b"first", b"second", b"third"]


@pytest.mark.parametrize(("http", "pushed"), [(ChatHttpProtocol, True), ("httptools", False)])
def test_under_the_chat_protocol_a_reply_is_pushed_not_pulled(
    live_app: Callable[..., LiveApp], monkeypatch: pytest.MonkeyPatch, http: Any, pushed: bool
) -> None:
    """The production protocol hands the turn a writer, and the reply goes to it from the upstream's
    callbacks; any other server gets the same reply pulled through ASGI `send()`."""
    pulled: list[int] = []
    real = Turn.chunks

    def chunks(self: Turn) -> AsyncIterator[bytes]:
        pulled.append(1)
        return real(self)

    monkeypatch.setattr(Turn, "chunks", chunks)
    app = live_app(http)
    assert app.chat("s", "one two three").text == "echo: one two three [turns=1]"
    assert app.chat("s", "@@deltas=50").text == "".join(f"w{i} " for i in range(50))
    assert pulled == ([] if pushed else [1, 1])


class WholeReply:
    """A reply whose every byte had arrived with its first text: piping it ends it at once."""

    decoder = None

    def pipe(self, on_text: Callable[[bytes], None], on_end: Callable[[Any], None]) -> bool:
        on_text(b" and the rest")
        on_end(None)
        return True


@pytest.mark.anyio
async def test_a_reply_already_whole_when_relayed_is_still_pushed() -> None:
    written: list[bytes] = []
    hold = Hold(reply=WholeReply())  # type: ignore[arg-type]
    turn = Turn(None, TurnReport("r"), hold, b"first", None, "hi", False, 0.0)  # type: ignore[arg-type]
    relayed = turn.relay(written.append)
    assert relayed is not None  # not a fall-back to pulling
    await asyncio.wait_for(relayed, 1.0)
    assert written == [b" and the rest"]
    assert hold.relayed == len(b" and the rest")


def test_a_client_gone_with_a_request_pipelined_behind_its_turn_ends_the_turn(
    live_app: Callable[..., LiveApp], standin: StandInModel
) -> None:
    """uvicorn tells only the newest request on a connection that its client left; the turn being
    answered, with another request queued behind it, must hear it too, or it would run on and commit."""
    app = live_app()
    cancelled = standin.streams_cancelled
    body = b'{"message": "@@deltas=100 @@delay=0.05"}'
    host, port = app.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /chat/piped/stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body) + b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    wait_until(lambda: standin.streams_cancelled > cancelled, 2.0, "the upstream stream to be closed")
    reports = app.wait_reports(1)
    assert reports[0].outcome is Outcome.CLIENT_DISCONNECTED_WHILE_STREAMING
    assert not reports[0].committed
    assert app.history("piped") == []
