"""The server protocol that tells a turn its client left, without a task waiting in `receive()`."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from api.outcomes import Outcome
from api.protocol import CLIENT_GONE, ON_DISCONNECT, ChatHttpProtocol, unwatch_disconnect, watch_disconnect
from api.standin import StandInModel
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
