"""`CHAT_DISCONNECT_GRACE_SECONDS`: a turn whose client left runs on a while, in case a reader comes.

A reader is a resume GET or a retry with the turn's idempotency key, on any worker. If one comes in
time, the turn runs to its end and commits, and the reader gets the whole reply; if none does, the
turn is cancelled as it would have been at once without a grace period: its upstream is closed and
nothing is stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from api.turn.service import Turn


class Grace:
    __slots__ = ("_timer", "seconds", "started", "turn")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.turn: Turn | None = None  # the turn, once its reply is being sent
        self.started = False
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, cancel: Callable[[], None]) -> bool:
        """The client left: keep the turn running, and call `cancel` when the period is over unless a
        reader came. False when there is no grace to give (the caller cancels the turn now)."""
        turn = self.turn
        if self.seconds <= 0 or turn is None or turn.keys is None or self.started:
            return False
        self.started = True
        turn.throttle(False)  # a client that is gone must not hold the reply back any more
        self._timer = asyncio.get_running_loop().call_later(self.seconds, self._over, cancel)
        return True

    def _over(self, cancel: Callable[[], None]) -> None:
        self._timer = None
        if self.turn is not None and not self.turn.followed:
            cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.turn = None
