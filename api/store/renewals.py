"""Keeps alive every session lock and stream lease this worker holds, from admission to the end.

One task per worker renews all of them in one pipelined round trip every third of their ttl. A turn
is covered from the moment it takes its lock, so a slow first token, the SDK's retries or a long
silence mid-reply cannot let the lock lapse while the turn still runs; and the hot path does
nothing per chunk but read a flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from api.store.redis import Client
from api.store.scripts import Bundle, ScriptCall, run_together

log = logging.getLogger("api.store.renewals")


class Renewable(Protocol):
    lost: bool  # set when the lock turned out to be someone else's: the turn must stop

    def renewals(self) -> tuple[ScriptCall | None, ScriptCall | None]:
        """The lock's renewal and the lease's, built when they are sent: an open stream keeps none."""
        ...


class Renewer:
    def __init__(
        self,
        redis: Client,
        period: float,
        on_error: Callable[[], None] | None = None,
        bundle: Bundle | None = None,
    ) -> None:
        self.redis = redis
        self.bundle = bundle
        self.period = period
        self.on_error = on_error
        self._held: set[Renewable] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, item: Renewable) -> None:
        self._held.add(item)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def discard(self, item: Renewable) -> None:
        self._held.discard(item)

    async def renew_all(self) -> None:
        items = list(self._held)
        calls: list[ScriptCall] = []
        locks: list[tuple[Renewable, int]] = []  # which result tells each item whether it kept its lock
        for item in items:
            lock, lease = item.renewals()
            if lock is not None:
                locks.append((item, len(calls)))
                calls.append(lock)
            if lease is not None:
                calls.append(lease)
        if not calls:
            return
        try:
            results = await run_together(self.redis, calls, bundle=self.bundle)
        except Exception:
            # Redis is away: the locks may lapse, and then the commits' fence refuses those turns.
            if self.on_error is not None:
                self.on_error()
            log.warning("could not renew %d locks and leases", len(calls), exc_info=True)
            return
        for item, index in locks:
            if results[index] == 0 and item in self._held:
                item.lost = True

    async def _run(self) -> None:
        while self._held:
            await asyncio.sleep(self.period)
            await self.renew_all()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
