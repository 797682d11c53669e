"""A canary for the uvicorn internals `api/http/protocol.py` stands on.

uvicorn has no public API for what the protocol does (tell a turn its client left without a task in
`receive()`, write a reply's chunks from a callback), so it subclasses uvicorn's httptools protocol and
uses private names: `_start_asgi_task`, the request cycle's fields, `FlowControl._is_writable_event`.
Where those move, the protocol falls back to plain ASGI without a word, and the memory and CPU it buys
are gone. pyproject.toml pins uvicorn to the releases tested; these tests fail loudly, naming what
moved, when the installed uvicorn is outside that pin or its internals are not what the protocol expects.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
from importlib.metadata import requires, version
from typing import Any

from packaging.requirements import Requirement
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from api.http.protocol import CLIENT_WRITER, ON_DISCONNECT, ChatHttpProtocol, ClientWriter, watch_disconnect
from tests.processes import ThreadServer, wait_until

MOVED = "uvicorn {version} moved {what}, which api/http/protocol.py relies on: re-test it and re-pin uvicorn"


def test_the_installed_uvicorn_is_within_the_pinned_range() -> None:
    pins = [Requirement(r) for r in requires("redis-chat-api") or [] if Requirement(r).name == "uvicorn"]
    assert pins, "pyproject.toml must name uvicorn"
    pin = pins[0].specifier
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in pin), f"uvicorn is not pinned: {pin}"
    assert version("uvicorn") in pin, f"uvicorn {version('uvicorn')} is outside the tested range {pin}"


def test_the_private_names_the_protocol_uses_are_where_it_expects_them() -> None:
    where = version("uvicorn")
    start = getattr(HttpToolsProtocol, "_start_asgi_task", None)
    assert callable(start), MOVED.format(version=where, what="HttpToolsProtocol._start_asgi_task")
    assert list(inspect.signature(start).parameters) == ["self", "cycle", "app"], MOVED.format(
        version=where, what="the signature of _start_asgi_task"
    )
    for hook in ("on_headers_complete", "on_response_complete", "connection_lost", "connection_made"):
        assert hook in vars(HttpToolsProtocol), MOVED.format(version=where, what=f"HttpToolsProtocol.{hook}")
    cycle_source = inspect.getsource(RequestResponseCycle.__init__)
    for field in ("scope", "flow", "message_event", "disconnected", "response_complete", "chunked_encoding"):
        assert re.search(rf"self\.{field}\b[^=\n]*=", cycle_source), MOVED.format(
            version=where, what=f"RequestResponseCycle.{field}"
        )

    class Transport:
        def pause_reading(self) -> None: ...

    flow = FlowControl(Transport())  # type: ignore[arg-type]
    assert isinstance(getattr(flow, "_is_writable_event", None), asyncio.Event), MOVED.format(
        version=where, what="FlowControl._is_writable_event"
    )
    assert flow.write_paused is False, MOVED.format(version=where, what="FlowControl.write_paused")


def test_under_the_installed_uvicorn_a_request_gets_the_marks_and_hears_its_client_leave() -> None:
    seen: dict[str, Any] = {}
    gone = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen["disconnect_mark"] = ON_DISCONNECT in scope
        seen["writer"] = scope.get(CLIENT_WRITER)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        writer = seen["writer"]
        if isinstance(writer, ClientWriter):
            writer.write(b"pushed")
        seen["watched"] = watch_disconnect(scope, gone.set)
        await gone.wait()  # only the protocol's hook can end this: nothing waits in receive()
        seen["gone"] = True

    with ThreadServer(app, http=ChatHttpProtocol) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            received = b""
            while b"pushed" not in received:
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk
        wait_until(lambda: seen.get("gone", False), 5, "the app to hear its client leave")
    where = version("uvicorn")
    assert seen["disconnect_mark"], MOVED.format(version=where, what="the request cycle (no disconnect mark)")
    assert isinstance(seen["writer"], ClientWriter), MOVED.format(
        version=where, what="the cycle's flow control"
    )
    assert seen["watched"] is True
    assert b"6\r\npushed\r\n" in received
