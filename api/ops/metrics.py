"""Prometheus metrics, recorded once per request from its `TurnReport` (nothing per chunk).

| metric | type | labels |
|---|---|---|
| `chat_requests_total` | counter | `outcome`: success, rejected, upstream_error, ... |
| `chat_streams_in_flight` | gauge | chat requests being served right now |
| `chat_time_to_first_token_seconds` | histogram | request start to Claude's first text |
| `chat_stream_duration_seconds` | histogram | request start to end, for replies that started |
| `chat_upstream_errors_total` | counter | `type`: one of `api.upstream.client.UPSTREAM_ERRORS` |
| `chat_tokens_total` | counter | `direction`: input, output, cache_read, cache_write (as Claude counted them, failed turns too) |
| `chat_redis_errors_total` | counter | session reads and writes that failed: Redis unreachable or too slow |

With several processes per container (`CHAT_WORKERS` > 1) `chat-api serve` points
PROMETHEUS_MULTIPROC_DIR at a directory they share; each process writes its own numbers there and
whichever process answers a scrape adds them all up.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from api.outcomes import Outcome, OutcomeRecorder, TurnReport
from api.upstream.client import UPSTREAM_ERRORS

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
_DURATION_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


class Metrics:
    def __init__(self) -> None:
        self.shared_dir = os.environ.get(MULTIPROC_DIR) or None
        if self.shared_dir:
            forget_dead_processes(Path(self.shared_dir))
        # A registry per app, so that several apps in one process (tests) do not collide.
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "chat_requests", "Chat requests, by how they ended", ["outcome"], registry=registry
        )
        self.in_flight = Gauge(
            "chat_streams_in_flight",
            "Chat requests being served now, from admission to their outcome",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.first_token = Histogram(
            "chat_time_to_first_token_seconds",
            "Seconds from a chat request's start to the first text of its reply",
            buckets=_FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "chat_stream_duration_seconds",
            "Seconds from a chat request's start to its end, for replies that began streaming",
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "chat_upstream_errors", "Failures of Claude, by type", ["type"], registry=registry
        )
        self.tokens = Counter(
            "chat_tokens",
            "Tokens as Claude counted them, failed turns included",
            ["direction"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "chat_redis_errors",
            "Session reads and writes that failed: Redis unreachable or too slow",
            registry=registry,
        )
        # Every label value exists from the start, so dashboards and alerts see zeros rather than gaps.
        self._outcomes = {outcome: self.requests.labels(outcome.value) for outcome in Outcome}
        self._upstream = {kind: self.upstream_errors.labels(kind) for kind in UPSTREAM_ERRORS}
        self._tokens_in = self.tokens.labels("input")
        self._tokens_out = self.tokens.labels("output")
        self._tokens_cache_read = self.tokens.labels("cache_read")
        self._tokens_cache_write = self.tokens.labels("cache_write")

    def watch(self, recorder: OutcomeRecorder) -> None:
        recorder.observers.append(self.observe)
        recorder.in_flight_watchers.append(self.in_flight.set)

    def observe(self, report: TurnReport) -> None:
        self._outcomes[report.outcome].inc()
        if report.first_token_seconds is not None:
            self.first_token.observe(report.first_token_seconds)
            self.duration.observe(report.duration_seconds)
        if report.upstream_error is not None:
            counter = self._upstream.get(report.upstream_error)
            if counter is not None:
                counter.inc()
        if report.input_tokens:
            self._tokens_in.inc(report.input_tokens)
        if report.output_tokens:
            self._tokens_out.inc(report.output_tokens)
        if report.cache_read_input_tokens:
            self._tokens_cache_read.inc(report.cache_read_input_tokens)
        if report.cache_creation_input_tokens:
            self._tokens_cache_write.inc(report.cache_creation_input_tokens)

    def redis_error(self) -> None:
        self.redis_errors.inc()

    def render(self) -> bytes:
        if self.shared_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.shared_dir)
        return generate_latest(registry)

    def close(self) -> None:
        if self.shared_dir is not None:
            # This process's in-flight gauge must stop counting once it is gone.
            multiprocess.mark_process_dead(os.getpid(), self.shared_dir)


def forget_dead_processes(path: Path) -> None:
    """Drop the live gauges of processes that died without saying so (a crashed worker's in-flight count)."""
    for file in path.glob("gauge_live*.db"):
        match = _LIVE_GAUGE_FILE.fullmatch(file.name)
        if match is None:
            continue
        pid = int(match[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                multiprocess.mark_process_dead(pid, str(path))
        except PermissionError:
            pass  # alive, someone else's


def prepare_shared_dir(path: Path) -> None:
    """Empty the directory the processes will share: numbers left by an earlier run must not be added in."""
    path.mkdir(parents=True, exist_ok=True)
    for file in path.glob("*.db"):
        file.unlink(missing_ok=True)
