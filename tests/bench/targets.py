"""The processes a bench run measures, each pinned to its cores, and what /proc says about them.

The worker under test gets a core of its own; the stand-in model, Redis and the load generator share
the other(s). On a machine with a single core nothing is pinned, and the report says so.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.processes import ROOT, RedisServer, free_port, stop_process, wait_until

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class Cores:
    worker: frozenset[int] | None  # None: not pinned
    load: frozenset[int] | None

    @classmethod
    def split(cls) -> Cores:
        available = sorted(os.sched_getaffinity(0))
        if len(available) < 2:
            return cls(None, None)
        return cls(frozenset(available[:1]), frozenset(available[1:]))

    @property
    def pinned(self) -> bool:
        return self.worker is not None

    def describe(self) -> str:
        if self.worker is None or self.load is None:
            return "not pinned (one core)"
        return (
            f"worker on core {sorted(self.worker)}, stand-in + Redis + load generator on {sorted(self.load)}"
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE


def _pinned(cores: frozenset[int] | None) -> Any:
    if cores is None:
        return None
    return lambda: os.sched_setaffinity(0, cores)


class Process:
    """A server process the bench started: by PID, in its own session, its output in a log file."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], cores: frozenset[int] | None, log: Path
    ):
        self.name = name
        self.port = free_port()
        self.args = [a.replace("{port}", str(self.port)) for a in args]
        self.env = {**os.environ, **env}
        self.cores = cores
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30) -> None:
        self.env = {
            k.replace("{port}", str(self.port)): v.replace("{port}", str(self.port))
            for k, v in self.env.items()
        }
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_pinned(self.cores),
            )

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text(errors='replace')[-2000:]}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_until(listening, timeout, self.name)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)


def standin(cores: Cores, log_dir: Path) -> Process:
    return Process(
        "stand-in",
        [sys.executable, "-m", "api.dev.standin", "--port", "{port}"],
        {},
        cores.load,
        log_dir / "standin.log",
    )


def service_worker(
    cores: Cores,
    log_dir: Path,
    redis_url: str,
    upstream: str,
    name: str = "service",
    extra: dict[str, str] | None = None,
) -> Process:
    """One `chat-api serve` worker, configured as production would be: every limit is on (set too high
    to refuse anything), so each turn pays for its admission as it would in a deployment."""
    env = {
        "CHAT_RATE_LIMIT_REQUESTS": "1000000",
        "CHAT_RATE_LIMIT_TOKENS": "1000000000",
        "CHAT_RATE_LIMIT_CONCURRENT": "1000000",
        "REDIS_URL": redis_url,
        "ANTHROPIC_BASE_URL": upstream,
        "ANTHROPIC_API_KEY": "bench-key",
        "CHAT_ALLOW_OPEN_API": "true",
        "CHAT_PORT": "{port}",
        "CHAT_HOST": "127.0.0.1",
        "CHAT_WORKERS": "1",
        "CHAT_REDIS_PREFIX": "bench",
        "CHAT_LOG_FORMAT": "json",
        **(extra or {}),
    }
    return Process(name, [sys.executable, "-m", "api", "serve"], env, cores.worker, log_dir / f"{name}.log")


def tutorial_worker(cores: Cores, log_dir: Path, upstream: str) -> Process:
    env = {"ANTHROPIC_BASE_URL": upstream, "ANTHROPIC_API_KEY": "bench-key"}
    return Process(
        "tutorial",
        [sys.executable, "-m", "tests.bench.tutorial", "--port", "{port}"],
        env,
        cores.worker,
        log_dir / "tutorial.log",
    )


def idiomatic_worker(cores: Cores, log_dir: Path, redis_url: str, upstream: str) -> Process:
    env = {"ANTHROPIC_BASE_URL": upstream, "ANTHROPIC_API_KEY": "bench-key", "REDIS_URL": redis_url}
    return Process(
        "idiomatic",
        [sys.executable, "-m", "tests.bench.idiomatic", "--port", "{port}"],
        env,
        cores.worker,
        log_dir / "idiomatic.log",
    )


@dataclass(slots=True)
class RedisHandle:
    url: str
    pid: int | None  # when it runs on this machine, so its CPU can be read


@contextlib.contextmanager
def redis_for_bench(cores: Cores, work_dir: Path) -> Iterator[RedisHandle]:
    """REDIS_URL when it answers, else a redis-server of the bench's own on the load cores."""
    url = os.environ.get("REDIS_URL")
    if url:
        pid = _local_pid(url)
        if pid != -1:
            yield RedisHandle(url, pid)
            return
    server = RedisServer(work_dir / "redis")
    server.start()
    try:
        assert server.proc is not None
        if cores.load is not None:
            os.sched_setaffinity(server.proc.pid, cores.load)
        yield RedisHandle(server.url, server.proc.pid)
    finally:
        server.stop()


def _local_pid(url: str) -> int | None:
    """The server's PID when it is on this machine, None when elsewhere, -1 when it does not answer."""
    client = redis.Redis.from_url(url, socket_timeout=1)
    try:
        pid = int(client.info("server")["process_id"])
    except redis.RedisError:
        return -1
    finally:
        client.close()
    return pid if Path(f"/proc/{pid}").exists() else None
