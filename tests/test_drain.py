"""Graceful drain: a draining worker is not ready, refuses new turns, and waits for the ones in flight.

The whole drain of a `chat-api serve` process on SIGTERM is proven in test_topology.py (one process
behind nginx) and test_serve.py (several processes in one container).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from api.http.state import AppState
from api.ops.drain import Drain
from api.outcomes import Outcome, OutcomeRecorder, TurnReport
from tests.conftest import LiveApp


def app_state(app: LiveApp) -> AppState:
    state: AppState = app.server.server.config.app.state.current
    return state


def test_a_draining_worker_is_not_ready_and_refuses_new_turns(live_app: Callable[..., LiveApp]) -> None:
    app = live_app()
    assert app.chat("d", "before").status_code == 200
    app_state(app).draining = True

    ready = app.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.headers["retry-after"] == "1"
    refused = app.chat("d", "during")
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "unavailable"
    assert refused.headers["retry-after"] == "1"
    assert app.wait_reports(2)[-1].outcome is Outcome.REJECTED
    # Reads are quick and still served, so a client can see where its conversation stands.
    assert [m["content"] for m in app.history("d")] == ["before", "echo: before [turns=1]"]


def drain_for(seconds: float) -> tuple[Drain, OutcomeRecorder, Any]:
    recorder = OutcomeRecorder()
    state = SimpleNamespace(draining=False)
    return Drain(state, recorder, seconds), recorder, state  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_the_drain_ends_when_the_last_request_in_flight_is_reported() -> None:
    drain, recorder, state = drain_for(10)
    first, second = TurnReport("r1"), TurnReport("r2")
    recorder.begin(first)
    recorder.begin(second)
    waiting = asyncio.create_task(drain.wait())
    await asyncio.sleep(0.05)
    assert state.draining
    await recorder.record(first)
    await asyncio.sleep(0.05)
    assert not waiting.done()
    # A request refused before it began (never counted) does not end the drain early.
    await recorder.record(TurnReport("refused"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await recorder.record(second)
    assert await asyncio.wait_for(waiting, 1) == 0


@pytest.mark.anyio
async def test_the_drain_gives_up_at_its_time_limit() -> None:
    drain, recorder, _ = drain_for(0.3)
    recorder.begin(TurnReport("stuck"))
    started = time.monotonic()
    assert await drain.wait() == 1
    assert 0.25 <= time.monotonic() - started < 1.0
