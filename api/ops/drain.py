"""Graceful drain: a worker told to stop finishes the replies it is streaming, and takes no new ones.

    SIGTERM (or Ctrl-C)
      -> draining: /readyz answers 503, new chat requests get 503 `unavailable` with Retry-After;
         the socket stays open, so the load balancer and the health checks can see both
      -> wait until no chat request is in flight, or CHAT_DRAIN_SECONDS have passed
      -> hand the signal to the server (uvicorn), which closes the socket and idle connections,
         cuts whatever still runs after its own short grace period, and exits

A second Ctrl-C stops waiting. A second SIGTERM changes nothing: a supervisor and a process-group
kill may both deliver one.

The handler wraps the one the server installed before the app started, so the same drain works under
`chat-api serve` with one process or several, and under plain `uvicorn api.main:app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

from api.outcomes import OutcomeRecorder

log = logging.getLogger("api.ops.drain")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drainable(Protocol):
    """What a drain flips: the app's state, which readiness and admission read (`api.http.state.AppState`)."""

    draining: bool


Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Drain:
    def __init__(self, state: Drainable, recorder: OutcomeRecorder, seconds: float) -> None:
        self.state = state
        self.recorder = recorder
        self.seconds = seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: dict[int, Handler] = {}
        self._signalled = False
        self._handed_over = False
        self._task: asyncio.Task[None] | None = None

    def install(self) -> bool:
        """Take over SIGTERM and SIGINT; False where signals cannot be handled (not the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return True

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, previous)
        self._previous.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def wait(self) -> int:
        """Refuse new turns and wait for the ones in flight; returns how many were still running at the end."""
        self.state.draining = True
        idle = asyncio.Event()

        def watch(count: int) -> None:
            if count == 0:
                idle.set()

        self.recorder.in_flight_watchers.append(watch)
        try:
            if self.recorder.in_flight:
                log.info(
                    "draining: waiting up to %g s for %d chat request(s) in flight",
                    self.seconds,
                    self.recorder.in_flight,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(idle.wait(), self.seconds)
        finally:
            self.recorder.in_flight_watchers.remove(watch)
        left = self.recorder.in_flight
        if left:
            log.warning("drain time is over with %d chat request(s) still in flight; they will be cut", left)
        else:
            log.info("drained: no chat request in flight")
        return left

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self._handed_over:
            self._pass_on(sig)  # the server's own handling: a further Ctrl-C forces it
        elif not self._signalled:
            self._signalled = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._start, sig)
        elif sig == signal.SIGINT:
            log.info("stopping without waiting for the drain")
            self._hand_over(sig)

    def _start(self, sig: int) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(sig))

    async def _run(self, sig: int) -> None:
        await self.wait()
        self._hand_over(sig)

    def _hand_over(self, sig: int) -> None:
        if not self._handed_over:
            self._handed_over = True
            self._pass_on(sig)

    def _pass_on(self, sig: int) -> None:
        previous = self._previous.get(sig, signal.SIG_DFL)
        if callable(previous):
            previous(sig, None)
        elif previous == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)
