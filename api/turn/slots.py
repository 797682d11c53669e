"""This worker's generation slots: at most `size` replies at once, and a short, bounded wait for one.

A worker that took every request would share its CPU, memory and connections among more streams than
it can serve well; a request that cannot get a slot in time is better sent elsewhere with a 503.
"""

from __future__ import annotations

import asyncio
import math

from api.errors import Unavailable


class GenerationSlots:
    def __init__(self, size: int, wait_seconds: float) -> None:
        self.size = size
        self.wait_seconds = wait_seconds
        self.in_use = 0
        self._free = asyncio.Semaphore(size)

    async def take(self) -> None:
        """Take a slot, waiting up to `wait_seconds`; `Unavailable` when none frees in time."""
        if self._free.locked() and self.wait_seconds <= 0:
            raise self._busy()
        try:
            async with asyncio.timeout(self.wait_seconds):
                await self._free.acquire()
        except TimeoutError:
            raise self._busy() from None
        self.in_use += 1

    def give_back(self) -> None:
        self.in_use -= 1
        self._free.release()

    def _busy(self) -> Unavailable:
        return Unavailable(
            f"this worker is already generating {self.size} replies; try again shortly",
            retry_after=max(1, math.ceil(self.wait_seconds)),
        )
