"""`chat-api serve` with several processes in one container (CHAT_WORKERS=2): whichever process answers
a scrape reports the container's totals, and SIGTERM to the parent drains every process.

Pausing one process (SIGSTOP) sends every new connection on the shared socket to the other, which makes
"this request was served by that process" certain.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.dev.standin import StandInModel
from api.http.server import CLOSE_SECONDS
from tests.processes import Worker, wait_until

pytestmark = pytest.mark.slow

T = TypeVar("T")
DRAIN_SECONDS = 4.0


def server_processes(parent: int) -> list[int]:
    """The uvicorn worker processes under `parent` (not multiprocessing's helper process)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def with_only(serving: int, paused: int, action: Callable[[], T]) -> T:
    """Run `action` while `paused` is stopped, so that the shared socket's connections all go to `serving`."""
    del serving  # named for the reader
    os.kill(paused, signal.SIGSTOP)
    try:
        return action()
    finally:
        os.kill(paused, signal.SIGCONT)


def successes(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "chat_requests_total" and sample.labels == {"outcome": "success"}:
                return float(sample.value)
    raise KeyError("chat_requests_total")


@pytest.fixture
def serve(redis_url: str, prefix: str, standin: StandInModel, tmp_logs: Path) -> Iterator[Worker]:
    env = {
        "REDIS_URL": redis_url,
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": standin.url,
        "CHAT_REDIS_PREFIX": prefix,
        "CHAT_WORKERS": "2",
        "CHAT_DRAIN_SECONDS": str(DRAIN_SECONDS),
    }
    worker = Worker(env, tmp_logs / "serve.log")
    try:
        worker.start()
        assert worker.proc is not None
        parent = worker.proc.pid
        wait_until(lambda: len(server_processes(parent)) == 2, 20, "two server processes")
        first, second = server_processes(parent)

        def serves() -> None:
            wait_until(
                lambda: httpx.get(f"{worker.url}/healthz", timeout=1).status_code == 200, 20, "a process"
            )

        # Both processes have started serving, each on its own.
        with_only(first, second, serves)
        with_only(second, first, serves)
        yield worker
    finally:
        worker.stop()


def test_every_process_reports_the_containers_totals_and_sigterm_drains_them_all(serve: Worker) -> None:
    assert serve.proc is not None
    processes = first, second = server_processes(serve.proc.pid)

    def turns(count: int) -> None:
        for n in range(count):
            assert (
                httpx.post(f"{serve.url}/chat/stream", json={"message": f"m{n}"}, timeout=10).status_code
                == 200
            )

    with_only(first, second, lambda: turns(2))
    with_only(second, first, lambda: turns(3))
    # A turn is counted just after its last byte is sent: let both processes count before pausing one.
    wait_until(lambda: successes(serve.url) == 5, 5, "all five turns to be counted")
    assert with_only(first, second, lambda: successes(serve.url)) == 5
    assert with_only(second, first, lambda: successes(serve.url)) == 5

    streamed: dict[str, object] = {}

    def stream() -> None:
        parts: list[str] = []
        try:
            body = {"message": "@@deltas=15 @@delay=0.1"}
            with httpx.stream("POST", f"{serve.url}/chat/stream", json=body, timeout=20) as response:
                parts.extend(response.iter_text())
        except httpx.HTTPError as exc:
            streamed["error"] = exc
        streamed["text"] = "".join(parts)

    thread = threading.Thread(target=stream)
    thread.start()
    wait_until(
        lambda: "chat_streams_in_flight 1.0" in httpx.get(f"{serve.url}/metrics").text, 5, "the stream"
    )
    signalled = time.monotonic()
    os.kill(serve.proc.pid, signal.SIGTERM)  # as `docker stop` does: to the container's first process only
    wait_until(lambda: httpx.get(f"{serve.url}/readyz", timeout=1).status_code == 503, 2, "readiness 503")
    thread.join(10)
    assert "error" not in streamed, streamed.get("error")
    assert streamed["text"] == "".join(f"w{n} " for n in range(15))
    serve.proc.wait(DRAIN_SECONDS + CLOSE_SECONDS + 5)
    # Well before the drain time ran out: the processes left as soon as the reply was done.
    assert time.monotonic() - signalled < DRAIN_SECONDS
    assert not any(Path(f"/proc/{pid}").exists() for pid in processes)
