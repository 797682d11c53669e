"""The production topology on loopback, as docker-compose.yml runs it: nginx with the project's own
deploy/nginx.conf, three `chat-api serve` workers and a redis-server with AOF on.

One topology serves the whole module; a test that kills or drains a worker brings it back before it
ends. Every session a test commits is remembered, and the Redis restart test (last) checks them all.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.dev.standin import StandInModel
from api.http.server import CLOSE_SECONDS
from tests.processes import (
    ROOT,
    Nginx,
    RedisServer,
    Worker,
    free_port,
    loopback_nginx_conf,
    nginx_binary,
    wait_until,
)
from tests.rawhttp import RawConnection, request

pytestmark = pytest.mark.slow

DRAIN_SECONDS = 3.0


def metric(worker: Worker, name: str, **labels: str) -> float:
    """One sample from a worker's own /metrics."""
    text = httpx.get(f"{worker.url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise KeyError(f"{name}{labels} is not in /metrics")


@dataclass
class Topology:
    redis: RedisServer
    workers: list[Worker]
    nginx: Nginx
    standin: StandInModel
    lb: httpx.Client
    # Every session committed so far, with the messages every later read must show.
    committed: dict[str, list[str]] = field(default_factory=dict)

    def turn(self, session: str, message: str) -> httpx.Response:
        return self.lb.post(f"/chat/{session}/stream", json={"message": message})

    def commit(self, session: str, message: str) -> None:
        """A turn that must succeed, remembered for the Redis restart test."""
        response = self.turn(session, message)
        assert response.status_code == 200, response.text
        self.committed.setdefault(session, []).extend([message, response.text])

    def history(self, session: str, base: str | None = None) -> list[str]:
        response = httpx.get(f"{base or self.nginx.url}/chat/{session}/messages", timeout=5)
        assert response.status_code == 200, response.text
        return [message["content"] for message in response.json()["messages"]]

    def serving(self) -> Worker:
        """The worker that has a chat request in flight, found through its metrics."""
        found: list[Worker] = []

        def busy() -> list[Worker]:
            return [w for w in self.workers if metric(w, "chat_streams_in_flight") >= 1]

        def one_busy() -> bool:
            found[:] = busy()
            if len(found) != 1:
                return False
            # Twice, a moment apart: a request that just ended is counted until just after its last byte.
            time.sleep(0.1)
            return busy() == found

        wait_until(one_busy, 5, "one worker with a chat request in flight")
        return found[0]

    def revive(self) -> None:
        """Start again, on the same port, any worker a test killed or drained."""
        for worker in self.workers:
            if not worker.alive:
                worker.start()


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, standin: StandInModel) -> Iterator[Topology]:
    binary = nginx_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is required in CI (.ci/run installs nginx-light); the topology tests need it")
        pytest.skip("nginx is not installed (apt-get install nginx-light): the topology tests need it")
    root = tmp_path_factory.mktemp("topology")
    redis_server = RedisServer(root / "redis", appendonly=True)
    env = {
        "REDIS_URL": redis_server.url,
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": standin.url,
        "CHAT_REDIS_PREFIX": "topo",
        "CHAT_REDIS_TIMEOUT_SECONDS": "1",
        "CHAT_LOCK_TTL_SECONDS": "3",
        "CHAT_UPSTREAM_TIMEOUT_SECONDS": "10",
        "CHAT_DRAIN_SECONDS": str(DRAIN_SECONDS),
        "CHAT_LOG_FORMAT": "json",
    }
    workers = [Worker(env, root / f"worker{n}.log") for n in range(3)]
    conf = loopback_nginx_conf(
        (ROOT / "deploy" / "nginx.conf").read_text(),
        [f"127.0.0.1:{worker.port}" for worker in workers],
        free_port(),
        root / "nginx",
    )
    port = int(re.search(r"listen 127\.0\.0\.1:(\d+);", conf)[1])  # type: ignore[index]
    nginx = Nginx(binary, conf, port, root / "nginx")
    lb = httpx.Client(base_url=nginx.url, timeout=20)
    try:
        redis_server.start()
        for worker in workers:
            worker.launch()
        for worker in workers:
            worker.wait_ready()
        nginx.start()
        yield Topology(redis_server, workers, nginx, standin, lb)
    finally:
        lb.close()
        nginx.stop()
        for worker in workers:
            worker.stop()
        redis_server.stop()


@pytest.fixture
def whole(topology: Topology) -> Topology:
    """The topology with all three workers up, whatever an earlier test did to them."""
    topology.revive()
    return topology


def test_a_slow_reply_arrives_through_nginx_chunk_by_chunk(whole: Topology) -> None:
    started = time.monotonic()
    arrivals: list[tuple[float, bytes]] = []
    body = {"message": "@@deltas=8 @@delay=0.2"}
    with whole.lb.stream("POST", "/chat/slow/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.headers["x-accel-buffering"] == "no"  # for a further proxy in front
        for chunk in response.iter_raw():
            arrivals.append((time.monotonic() - started, chunk))
    assert b"".join(chunk for _, chunk in arrivals) == b"".join(b"w%d " % n for n in range(8))
    # The words came through one by one as the model produced them, not in one piece at the end.
    assert len(arrivals) >= 6
    assert arrivals[-1][0] - arrivals[0][0] >= 1.0
    whole.committed["slow"] = [body["message"], "".join(f"w{n} " for n in range(8))]


def test_a_conversation_round_robins_across_all_workers_and_stays_whole(whole: Topology) -> None:
    before = [metric(w, "chat_requests_total", outcome="success") for w in whole.workers]
    for n in range(1, 10):
        response = whole.turn("rr", f"turn {n}")
        assert response.status_code == 200, response.text
        # The model saw every earlier turn, whichever worker stored it.
        assert response.text == f"echo: turn {n} [turns={n}]"

    def served() -> list[float]:
        return [
            metric(w, "chat_requests_total", outcome="success") - b
            for w, b in zip(whole.workers, before, strict=True)
        ]

    # A turn is counted just after its last byte is sent.
    wait_until(lambda: sum(served()) == 9, 5, "all nine turns to be counted")
    assert all(count >= 1 for count in served()), f"turns per worker: {served()}"
    expected = [text for n in range(1, 10) for text in (f"turn {n}", f"echo: turn {n} [turns={n}]")]
    for worker in whole.workers:
        assert whole.history("rr", worker.url) == expected
    whole.committed["rr"] = expected


def test_request_ids_pass_through_nginx_and_every_log_line_is_json(whole: Topology) -> None:
    response = whole.lb.post(
        "/chat/ids/stream", json={"message": "hello"}, headers={"X-Request-Id": "trace-deploy-42"}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-deploy-42"
    whole.committed["ids"] = ["hello", response.text]
    # Without one, nginx makes the id, and the worker answers and logs with that same id.
    generated = whole.lb.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)

    def records() -> list[dict[str, Any]]:
        lines = [line for w in whole.workers for line in w.log_text().splitlines() if line.strip()]
        parsed = [orjson.loads(line) for line in lines]  # every line is one JSON object
        assert all(isinstance(record, dict) for record in parsed)
        return parsed

    def logged() -> bool:
        return any(
            r.get("request_id") == "trace-deploy-42" and r.get("outcome") == "success" for r in records()
        )

    wait_until(logged, 5, "the turn's JSON log line with its request id")
    wait_until(
        lambda: '"request_id":"trace-deploy-42"' in whole.nginx.log_text(), 5, "nginx's access log line"
    )


@pytest.mark.parametrize("refused", ["two words", "r" * 129, "caf\u00e9", "a/b"])
def test_a_request_id_the_workers_would_refuse_is_replaced_by_nginx_s(whole: Topology, refused: str) -> None:
    """nginx passes on only an id the workers accept; any other is replaced by nginx's own, so its
    access log, the worker's log and the response all name the request alike."""
    response = whole.lb.get("/healthz", headers={"X-Request-Id": refused.encode()})
    assert response.status_code == 200
    rid = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
    wait_until(lambda: f'"request_id":"{rid}"' in whole.nginx.log_text(), 5, "nginx's access log line")
    assert refused not in whole.nginx.log_text()


def test_behind_nginx_a_path_outside_ascii_is_400_and_the_client_keeps_its_connection(
    whole: Topology,
) -> None:
    """A worker's parser refuses raw non-ASCII in the request line and closes its side; nginx passes
    the answer on and keeps the client's own connection."""
    with RawConnection(whole.nginx.url) as conn:
        body = b'{"message": "hi"}'
        headers = {"content-type": b"application/json"}
        refused = conn.request(request("POST", "/chat/café/stream".encode(), headers, body))
        assert refused.status == 400 and refused.error()["type"] == "invalid_request"
        assert conn.request(request("GET", b"/healthz")).status == 200


def test_nginx_answers_for_itself_in_the_api_error_shape(whole: Topology) -> None:
    # Up to the app's byte limit, a body reaches a worker (which refuses this message for its length)...
    near = whole.lb.post("/chat/big/stream", json={"message": "x" * 250_000})
    assert near.status_code == 413
    assert "characters" in near.json()["error"]["message"]
    # ...past it, nginx refuses it without passing it on, in the same shape.
    over = whole.lb.post("/chat/big/stream", json={"message": "x" * 300_000})
    assert over.status_code == 413
    assert over.json()["error"]["type"] == "request_too_large"
    assert over.headers["x-request-id"]
    # Each worker counts only itself, so the balancer does not pretend to have one answer.
    scrape = whole.lb.get("/metrics")
    assert scrape.status_code == 404
    assert scrape.json()["error"]["type"] == "not_found"


def test_a_killed_worker_loses_no_session_and_its_started_turn_is_never_resent(whole: Topology) -> None:
    sessions = [f"kill{n}" for n in range(3)]
    for session in sessions:
        whole.commit(session, "before")
    marker = f"doomed-{uuid.uuid4().hex}"
    result: dict[str, httpx.Response] = {}

    def doomed() -> None:
        result["response"] = whole.lb.post("/chat/stream", json={"message": f"{marker} @@first_delay=5"})

    thread = threading.Thread(target=doomed)
    thread.start()
    victim = whole.serving()

    def asked(count: int) -> bool:
        return sum(marker in str(r.body) for r in whole.standin.requests) == count

    wait_until(lambda: asked(1), 5, "the worker to send the turn to the model")
    victim.kill(signal.SIGKILL)
    thread.join(15)
    assert not thread.is_alive()
    # The worker had started the turn: nginx reports it failed rather than running it again elsewhere.
    response = result["response"]
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "unavailable"
    assert response.headers["retry-after"] == "1"
    assert asked(1)

    # Requests that could not reach the dead worker go to the others, and every session carries on.
    for session in sessions:
        response = whole.turn(session, "after")
        assert response.status_code == 200, response.text
        assert response.text == "echo: after [turns=2]"
        whole.committed[session] += ["after", response.text]
        assert whole.history(session) == whole.committed[session]


def test_sigterm_drains_a_worker_its_stream_completes_and_it_exits_in_time(whole: Topology) -> None:
    whole.commit("drain", "first")
    message = "@@deltas=12 @@delay=0.1 drained"
    streamed: dict[str, Any] = {}

    def stream(url: str, path: str, text: str, key: str) -> None:
        parts: list[str] = []
        try:
            with httpx.stream("POST", url + path, json={"message": text}, timeout=20) as response:
                streamed[key + ".status"] = response.status_code
                for part in response.iter_text():
                    parts.append(part)
        except httpx.HTTPError as exc:
            streamed[key + ".error"] = exc
        streamed[key] = "".join(parts)

    through_lb = threading.Thread(target=stream, args=(whole.nginx.url, "/chat/drain/stream", message, "lb"))
    through_lb.start()
    victim = whole.serving()
    # A second reply on the same worker, longer than the drain allows.
    too_long = threading.Thread(
        target=stream, args=(victim.url, "/chat/stream", "@@deltas=200 @@delay=0.05", "long")
    )
    too_long.start()
    wait_until(lambda: metric(victim, "chat_streams_in_flight") == 2, 5, "both replies to start")

    signalled = time.monotonic()
    victim.kill(signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{victim.url}/readyz", timeout=1).status_code == 503, 2, "readiness 503")
    refused = httpx.post(f"{victim.url}/chat/drain2/stream", json={"message": "new"}, timeout=5)
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "unavailable"
    assert refused.headers["retry-after"] == "1"

    through_lb.join(10)
    assert streamed["lb.status"] == 200
    assert "lb.error" not in streamed, streamed.get("lb.error")
    assert streamed["lb"] == "".join(f"w{n} " for n in range(12))
    assert victim.alive, "the worker left before the drain time although a reply was still streaming"

    assert victim.proc is not None
    victim.proc.wait(DRAIN_SECONDS + CLOSE_SECONDS + 5)
    exited = time.monotonic() - signalled
    assert exited <= DRAIN_SECONDS + CLOSE_SECONDS + 1.5
    too_long.join(5)
    assert isinstance(streamed.get("long.error"), httpx.RemoteProtocolError)  # cut, and visibly so
    assert len(streamed["long"]) < len("".join(f"w{n} " for n in range(200)))

    # A rolling restart: the worker comes back on its port and the conversation goes on, whole.
    victim.start()
    whole.committed["drain"] += [message, streamed["lb"]]
    whole.commit("drain", "next")
    assert whole.committed["drain"][-1] == "echo: next [turns=3]"
    assert whole.history("drain", victim.url) == whole.committed["drain"]


def test_while_redis_is_down_requests_get_503_and_the_same_workers_recover(whole: Topology) -> None:
    whole.commit("redis", "before the outage")
    pids = [w.proc.pid for w in whole.workers if w.proc is not None]
    # SIGKILL: nothing gets flushed on the way out, so only the append-only file keeps the turns.
    whole.redis.stop(signal.SIGKILL)
    try:
        down = whole.turn("redis", "during the outage")
        assert down.status_code == 503
        assert down.json()["error"]["type"] == "unavailable"
        assert down.headers["retry-after"]
        assert whole.lb.get("/chat/redis/messages").status_code == 503
        for worker in whole.workers:
            assert httpx.get(f"{worker.url}/readyz", timeout=5).status_code == 503
    finally:
        whole.redis.start()

    def all_ready() -> bool:
        return all(httpx.get(f"{w.url}/readyz", timeout=2).status_code == 200 for w in whole.workers)

    wait_until(all_ready, 15, "every worker to be ready again")
    assert [w.proc.pid for w in whole.workers if w.proc is not None] == pids
    assert all(worker.alive for worker in whole.workers)
    whole.commit("redis", "after the outage")
    assert whole.committed["redis"][-1] == "echo: after the outage [turns=2]"
    for session, expected in whole.committed.items():
        assert whole.history(session) == expected, session
    assert sum(metric(w, "chat_redis_errors_total") for w in whole.workers) >= 1
