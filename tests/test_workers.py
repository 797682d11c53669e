"""Several real `chat-api serve` processes on one Redis: any worker continues any conversation."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from api.dev.standin import StandInModel
from tests.processes import Worker, wait_until, worker_env, workers
from tests.topologies import own_prefix

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(
    redis_url: str, standin: StandInModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Worker]]:
    """Two workers for the whole module: each test has sessions of its own."""
    with own_prefix(redis_url) as prefix:
        env = worker_env(redis_url, standin.url, prefix, CHAT_LOCK_TTL_SECONDS="2")
        with workers(2, env, tmp_path_factory.mktemp("logs")) as started:
            yield started


@pytest.fixture
def two_workers(deployment: list[Worker]) -> list[Worker]:
    """Both workers up, on their own ports, whatever an earlier test killed."""
    for worker in deployment:
        if not worker.alive:
            worker.start()
    return deployment


def turn(worker: Worker, session: str, message: str) -> httpx.Response:
    return httpx.post(f"{worker.url}/chat/{session}/stream", json={"message": message}, timeout=20)


def messages(worker: Worker, session: str) -> list[str]:
    response = httpx.get(f"{worker.url}/chat/{session}/messages", timeout=5)
    return [m["content"] for m in response.json()["messages"]] if response.status_code == 200 else []


def test_a_conversation_alternates_between_workers(two_workers: list[Worker]) -> None:
    for n in range(1, 7):
        worker = two_workers[n % 2]
        response = turn(worker, "alt", f"turn {n}")
        assert response.status_code == 200, response.text
        assert response.text == f"echo: turn {n} [turns={n}]"
    assert messages(two_workers[0], "alt") == messages(two_workers[1], "alt")
    assert len(messages(two_workers[0], "alt")) == 12


def test_concurrent_turns_across_workers_get_one_200(two_workers: list[Worker]) -> None:
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(turn, two_workers[n % 2], "race", f"m{n} @@deltas=5 @@delay=0.1") for n in range(8)
        ]
        statuses = sorted(f.result().status_code for f in futures)
    assert statuses == [200] + [409] * 7
    assert len(messages(two_workers[0], "race")) == 2


def test_a_worker_killed_mid_stream_commits_nothing(two_workers: list[Worker]) -> None:
    first, second = two_workers
    assert turn(first, "crash", "before").status_code == 200
    streaming = threading.Event()

    def doomed_turn() -> None:
        try:
            with httpx.stream(
                "POST",
                f"{first.url}/chat/crash/stream",
                json={"message": "@@deltas=100 @@delay=0.05"},
                timeout=20,
            ) as response:
                for _ in response.iter_raw():
                    streaming.set()
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=doomed_turn)
    thread.start()
    assert streaming.wait(10)
    first.kill(signal.SIGKILL)
    thread.join(10)

    # The dead worker's lock keeps the session for at most its ttl (2 s); then the other worker serves it.
    started = time.monotonic()
    wait_until(lambda: turn(second, "crash", "after").status_code == 200, 5, "the lock to expire")
    assert time.monotonic() - started < 2.6  # the ttl, and a poll and a turn of slack
    assert messages(second, "crash") == ["before", "echo: before [turns=1]", "after", "echo: after [turns=2]"]
