"""uvicorn's httptools protocol, which also tells a running turn the moment its client has gone.

ASGI's only news of a disconnect is a `receive()` that returns `http.disconnect`, so an app that must
stop work when its client leaves keeps a task waiting in `receive()` for the whole response. For a
relay that is a task, three coroutines and a future held by every open stream, for an event that
the server itself sees directly in `connection_lost`. This protocol marks each request's scope with
`ON_DISCONNECT`; an app that finds the mark puts a callback there, and the protocol calls it when
the connection is lost before the response completed. Apps that do not find it (another server, an
in-process test client) keep waiting in `receive()`, which still works the same.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# The scope key: None until the app registers its callback, CLIENT_GONE once the client left before it
# did; absent under any other server.
ON_DISCONNECT = "chat_api.on_disconnect"
CLIENT_GONE = "gone"

DisconnectHook = Callable[[], None]


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


class ChatHttpProtocol(HttpToolsProtocol):
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

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        # uvicorn flags the cycle as disconnected only while its response is incomplete.
        if cycle is None or not cycle.disconnected or ON_DISCONNECT not in cycle.scope:
            return
        hook = cycle.scope[ON_DISCONNECT]  # type: ignore[literal-required]
        cycle.scope[ON_DISCONNECT] = CLIENT_GONE  # type: ignore[literal-required]
        if callable(hook):
            hook()
