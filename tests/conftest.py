from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from api.config import Settings
from api.dev.standin import StandInModel, StandInThread
from api.http.protocol import ChatHttpProtocol
from api.main import create_app
from api.outcomes import TurnReport
from tests.processes import RedisServer, ThreadServer, Worker
from tests.topologies import Cluster, own_prefix, store_client, suite_mode


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _reachable(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL when it answers; otherwise a redis-server of the suite's own. With
    CHAT_REDIS_MODE=cluster in the environment (which the workers and the settings read too), a
    Redis Cluster of the suite's own: 3 primaries and 3 replicas, REDIS_URL its first node."""
    if suite_mode() == "cluster":
        cluster = Cluster(tmp_path_factory.mktemp("cluster"))
        cluster.start()
        try:
            yield cluster.url
        finally:
            cluster.stop()
        return
    url = os.environ.get("REDIS_URL")
    if url and _reachable(url):
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of the test's own, so tests share a Redis without seeing each other's keys."""
    with own_prefix(redis_url) as name:
        yield name


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    client = store_client(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def standin() -> Iterator[StandInModel]:
    with StandInThread() as model:
        yield model


@pytest.fixture
def make_settings(redis_url: str, prefix: str, standin: StandInModel) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "anthropic_api_key": "test-key",
            "anthropic_base_url": standin.url,
            "redis_url": redis_url,
            "redis_prefix": prefix,
            "upstream_timeout_seconds": 5.0,
            "lock_ttl_seconds": 5.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


class LiveApp:
    """The app on a real socket, and the reports it handed to `on_turn_end`."""

    def __init__(self, server: ThreadServer, reports: list[TurnReport]) -> None:
        self.server = server
        self.reports = reports
        self.url = server.url
        self.client = httpx.Client(base_url=server.url, timeout=20)

    def chat(self, session: str | None, message: str | None = None, **body: Any) -> httpx.Response:
        if message is not None:
            body["message"] = message
        path = f"/chat/{session}/stream" if session else "/chat/stream"
        return self.client.post(path, json=body)

    def send_chat(self, path: str, message: str, receive_buffer: int | None = None) -> socket.socket:
        """A chat POST written on a raw socket of its own, left open: the caller reads or leaves.
        `receive_buffer` shrinks the socket's receive buffer, for a client that holds little."""
        body = orjson.dumps({"message": message})
        host, port = self.url.removeprefix("http://").split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(5)
        if receive_buffer is not None:  # before connecting, so the window it offers is small too
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.connect((host, int(port)))
        sock.sendall(
            b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
        )
        return sock

    def history(self, session: str) -> list[dict[str, Any]]:
        response = self.client.get(f"/chat/{session}/messages")
        if response.status_code == 404:
            return []
        response.raise_for_status()
        messages: list[dict[str, Any]] = response.json()["messages"]
        return messages

    def wait_reports(self, count: int, timeout: float = 5.0) -> list[TurnReport]:
        from tests.processes import wait_until

        wait_until(lambda: len(self.reports) >= count, timeout, f"{count} turn reports")
        return self.reports


@pytest.fixture
def live_app(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., LiveApp]]:
    """A factory: `live_app(**settings)` starts the app on a real socket (under the production server's
    protocol unless `http` names another); all are stopped afterwards."""
    with contextlib.ExitStack() as stack:

        def start(http: type[asyncio.Protocol] | str = ChatHttpProtocol, **overrides: Any) -> LiveApp:
            reports: list[TurnReport] = []
            app = create_app(make_settings(**overrides), on_turn_end=reports.append)
            server = stack.enter_context(ThreadServer(app, http))
            live = LiveApp(server, reports)
            stack.callback(live.client.close)
            return live

        yield start


@contextlib.asynccontextmanager
async def asgi_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """httpx over ASGITransport, with the app's lifespan run around it (ASGITransport does not)."""
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: dict[str, Any], receive: Any, send: Any) -> None:
            scope["state"] = dict(state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a server counter: connection_lost runs a loop iteration or so after the client leaves."""
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached within 2 s")


@pytest.fixture
def tmp_logs(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def chat_servers(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, standin: StandInModel
) -> Iterator[Callable[..., list[Worker]]]:
    """A factory: `chat_servers({"CHAT_X": "..."}, ...)` starts a `chat-api serve` process for each
    environment given, side by side (each spends seconds importing the app), on the stand-in model and
    with keys of its own in the suite's Redis; every one is stopped when the module ends."""
    started: list[Worker] = []

    def start(*envs: dict[str, str]) -> list[Worker]:
        base = {
            "REDIS_URL": redis_url,
            "ANTHROPIC_API_KEY": "test-key",
            "ANTHROPIC_BASE_URL": standin.url,
            "CHAT_UPSTREAM_TIMEOUT_SECONDS": "10",
            "CHAT_LOCK_TTL_SECONDS": "5",
        }
        batch = [
            Worker(
                {**base, "CHAT_REDIS_PREFIX": "t" + uuid.uuid4().hex[:12], **env},
                tmp_path_factory.mktemp("server") / "worker.log",
            )
            for env in envs
        ]
        started.extend(batch)
        for worker in batch:
            worker.launch()
        for worker in batch:
            worker.wait_ready(timeout=60)  # generous: the machine may be busy with other processes
        return batch

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()
