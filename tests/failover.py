"""Load for the failover tests: clients that keep turns going while a test kills Redis under them,
and the accounts kept of every turn, which say afterwards what was lost, doubled or broken.

Each turn goes to a session of its own, so a session's history holds that turn whole or not at all:
nothing else may ever be seen in it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from tests.processes import wait_until

# A reply of a few deltas a few tens of milliseconds apart: long enough that a kill finds streams open.
DIRECTIVES = "@@delay=0.03"


@dataclass
class Result:
    session: str
    message: str  # as sent and stored; the stand-in's reply leaves its directives out
    status: int = 0
    retry_after: str | None = None
    error_type: str | None = None
    completed: bool = False  # the whole reply and its final chunk arrived
    text: str = ""
    failure: str | None = None  # what cut the exchange short, by its exception's name
    started: float = 0.0
    ended: float = 0.0


@dataclass
class Load:
    """`clients` threads, each sending one turn after another to `url`, until `stop()`."""

    url: str
    clients: int
    tag: str
    pause: Callable[[], float] = lambda: 0.0
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        for n in range(self.clients):
            thread = threading.Thread(target=self._client, args=(n,), daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self._threads), "a client is stuck"

    def _client(self, n: int) -> None:
        # Read timeout well above anything the service may take: a request that hits it hung.
        timeout = httpx.Timeout(20.0, connect=5.0)
        with httpx.Client(base_url=self.url, timeout=timeout) as client:
            for turn in itertools.count():
                if self._stop.is_set():
                    return
                result = self._turn(client, f"{self.tag}-{n}-{turn}")
                with self._lock:
                    self.results.append(result)
                if result.status != 200:
                    self._stop.wait(0.05)  # as a client honouring Retry-After would, but briefly

    def _turn(self, client: httpx.Client, session: str) -> Result:
        result = Result(session, f"turn {session} {DIRECTIVES}", started=time.monotonic())
        try:
            body = {"message": result.message}
            with client.stream("POST", f"/chat/{session}/stream", json=body) as response:
                result.status = response.status_code
                result.retry_after = response.headers.get("retry-after")
                text = response.read().decode()
                if response.status_code == 200:
                    result.text = text
                    result.completed = True
                else:
                    result.error_type = response.json()["error"]["type"]
        except httpx.HTTPError as exc:
            result.failure = type(exc).__name__
        result.ended = time.monotonic()
        return result

    def count(self, check: Callable[[Result], bool]) -> int:
        with self._lock:
            return sum(1 for result in self.results if check(result))

    def wait_for(self, check: Callable[[Result], bool], at_least: int, timeout: float, what: str) -> None:
        wait_until(lambda: self.count(check) >= at_least, timeout, what)


def expected_reply(result: Result) -> str:
    return f"echo: turn {result.session} [turns=1]"


@dataclass
class Audit:
    completed: int
    lost: list[str]  # completed turns that are not stored
    broken: list[str]  # sessions whose history is anything but one whole turn, or nothing


def audit(results: list[Result], url: str) -> Audit:
    """Read back through the service every session a turn went to: a completed turn must be there,
    whole and once; one that did not complete may be there whole (its commit landed, its last chunk
    did not) or absent."""
    lost, broken = [], []
    with httpx.Client(base_url=url, timeout=10) as client:
        for result in results:
            response = client.get(f"/chat/{result.session}/messages")
            if response.status_code != 404:
                response.raise_for_status()
            stored = [m["content"] for m in response.json()["messages"]] if response.is_success else []
            if not stored:
                if result.completed:
                    lost.append(result.session)
            elif stored != [result.message, expected_reply(result)]:
                broken.append(f"{result.session}: {stored!r}")
    return Audit(sum(1 for r in results if r.completed), lost, broken)


def improper(results: list[Result]) -> list[str]:
    """Every answer that is not a turn's: anything but 200, or 503 `unavailable` with Retry-After,
    and any request that hung. A stream cut short after its 200 is a proper end for a turn whose
    commit failed (the client sees no final chunk and retries)."""
    wrong = []
    for r in results:
        if r.failure in ("ReadTimeout", "ConnectTimeout", "PoolTimeout", "WriteTimeout"):
            wrong.append(f"{r.session}: hung ({r.failure})")
        elif r.status == 503:
            if r.retry_after is None or r.error_type != "unavailable":
                wrong.append(f"{r.session}: 503 without Retry-After or of type {r.error_type}")
        elif r.status == 0:
            wrong.append(f"{r.session}: no response ({r.failure})")
        elif r.status != 200:
            wrong.append(f"{r.session}: {r.status} {r.error_type}")
    return wrong


def figures(title: str, results: list[Result], found: Audit, **times: float) -> list[str]:
    """The lines a failover test prints for its reader (and docs/redis-topologies.md quotes)."""
    unavailable = sum(1 for r in results if r.status == 503)
    cut = sum(1 for r in results if r.status == 200 and not r.completed)
    lines = [
        f"{title}: {len(results)} turns sent, {found.completed} completed, {unavailable} got 503,"
        f" {cut} cut short after their 200; completed turns lost: {len(found.lost)}",
    ]
    if times:
        lines.append(
            "  " + ", ".join(f"{name.replace('_', ' ')} {value:.1f} s" for name, value in times.items())
        )
    return lines
