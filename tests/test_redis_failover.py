"""Redis dies under load: a Sentinel master `kill -9`ed mid-stream, and a single Redis with
`appendfsync always` killed and restarted. Every answer stays a turn's or a 503 with Retry-After,
no turn is stored twice or in part, turns succeed again soon after without restarting the worker,
and the test prints how many turns clients saw complete were lost.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from api.dev.standin import StandInModel
from tests.conftest import LiveApp
from tests.failover import Load, audit, figures, improper
from tests.processes import RedisServer, Worker, redis_server_binary, wait_until
from tests.topologies import NO_SYNC_DELAY, Node, SentinelSet, require_redis_tools

pytestmark = pytest.mark.slow

STREAMS = 50  # clients, each with a turn streaming almost all the time


def worker_env(standin: StandInModel, **extra: str) -> dict[str, str]:
    return {
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": standin.url,
        "CHAT_REDIS_PREFIX": "failover",
        "CHAT_REDIS_TIMEOUT_SECONDS": "1",
        "CHAT_LOCK_TTL_SECONDS": "3",
        "CHAT_UPSTREAM_TIMEOUT_SECONDS": "10",
        **extra,
    }


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    found = SentinelSet(tmp_path / "sentinel")
    found.start()
    try:
        yield found
    finally:
        found.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["no-wait", "wait-1"])
def test_a_sentinel_failover_under_load_loses_no_confirmed_turn(
    sentinels: SentinelSet,
    standin: StandInModel,
    tmp_path: Path,
    wait_replicas: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = worker_env(
        standin,
        REDIS_URL="redis://127.0.0.1:6379/0",  # Sentinel names the master: only the db is read here
        CHAT_REDIS_MODE="sentinel",
        CHAT_REDIS_SENTINELS=sentinels.sentinel_addresses,
        CHAT_REDIS_SENTINEL_MASTER=sentinels.service,
        CHAT_REDIS_WAIT_REPLICAS=str(wait_replicas),
    )
    worker = Worker(env, tmp_path / "worker.log")
    worker.start(60)
    load = Load(worker.url, STREAMS, f"s{wait_replicas}")
    try:
        load.start()
        load.wait_for(lambda r: r.completed, 60, 60, "60 turns before the failover")
        old = sentinels.master()
        killed_at = time.monotonic()
        old.kill(signal.SIGKILL)
        wait_until(lambda: sentinels.master_address() != old.address, 30, "a sentinel to promote a replica")
        promoted_at = time.monotonic()
        # Turns succeed again, on the worker that was running all along.
        load.wait_for(
            lambda r: r.completed and r.started >= promoted_at,
            1,
            10,
            "a turn begun after the promotion to complete",
        )
        recovered_at = min(r.ended for r in load.results if r.completed and r.started >= promoted_at)
        done = load.count(lambda r: r.completed)
        load.wait_for(lambda r: r.completed, done + 60, 60, "60 turns after the failover")
    finally:
        load.stop()
    assert worker.alive, worker.log_text()[-2000:]
    assert httpx.get(f"{worker.url}/readyz", timeout=5).status_code == 200
    found = audit(load.results, worker.url)
    worker.stop()
    with capsys.disabled():
        print()
        for line in figures(
            f"Sentinel failover, CHAT_REDIS_WAIT_REPLICAS={wait_replicas}",
            load.results,
            found,
            promotion_after_kill=promoted_at - killed_at,
            first_turn_after_promotion=recovered_at - promoted_at,
        ):
            print(line)
    assert improper(load.results) == []
    assert found.broken == []
    if wait_replicas:
        assert found.lost == []


@pytest.mark.timeout(120)
def test_a_single_redis_with_appendfsync_always_killed_and_restarted_loses_no_completed_turn(
    standin: StandInModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_redis_tools()
    server = RedisServer(tmp_path / "redis", appendonly=True)  # appendfsync always
    server.start()
    worker = Worker(worker_env(standin, REDIS_URL=server.url), tmp_path / "worker.log")
    load = Load(worker.url, 20, "single")
    try:
        worker.start(60)
        load.start()
        load.wait_for(lambda r: r.completed, 60, 60, "60 turns before the kill")
        killed_at = time.monotonic()
        server.stop(signal.SIGKILL)
        load.wait_for(lambda r: r.status == 503, 1, 10, "a 503 while Redis is down")
        server.start()
        restarted_at = time.monotonic()
        load.wait_for(
            lambda r: r.completed and r.started >= restarted_at, 1, 10, "a turn begun after the restart"
        )
        recovered_at = min(r.ended for r in load.results if r.completed and r.started >= restarted_at)
        done = load.count(lambda r: r.completed)
        load.wait_for(lambda r: r.completed, done + 50, 60, "50 turns after the restart")
    finally:
        load.stop()
        found = audit(load.results, worker.url) if worker.alive else None
        worker.stop()
        server.stop()
    assert found is not None
    with capsys.disabled():
        print()
        for line in figures(
            "Single Redis, appendfsync always, kill -9 and restart",
            load.results,
            found,
            down=restarted_at - killed_at,
            first_turn_after_restart=recovered_at - restarted_at,
        ):
            print(line)
    assert improper(load.results) == []
    assert found.broken == []
    assert found.lost == []


def test_a_commit_no_replica_confirms_ends_the_reply_without_its_final_chunk(
    live_app: Callable[..., LiveApp],
) -> None:
    # The suite's Redis has no replica: WAIT 1 can never be satisfied.
    app = live_app(redis_wait_replicas=1, redis_timeout_seconds=0.3)
    with pytest.raises(httpx.RemoteProtocolError):
        app.chat("unconfirmed", "hello")
    assert app.client.get("/chat/unconfirmed/messages").json()["messages"][1]["content"] == (
        "echo: hello [turns=1]"
    )  # written on the primary all the same: a retry that finds it replays it
    [report] = app.wait_reports(1)
    assert not report.committed
    assert "not confirmed by 1 replicas" in (report.detail or "")


def test_a_commit_waits_for_a_replica_and_then_completes(
    live_app: Callable[..., LiveApp], tmp_path: Path
) -> None:
    require_redis_tools()
    primary = RedisServer(tmp_path / "primary", extra=NO_SYNC_DELAY)
    primary.start()
    replica = Node(redis_server_binary(), tmp_path / "replica")
    try:
        replica.start("--replicaof", "127.0.0.1", str(primary.port))
        with replica.client(decode_responses=True) as client:
            wait_until(lambda: client.info("replication")["master_link_status"] == "up", 10, "the replica")
        app = live_app(redis_url=primary.url, redis_wait_replicas=1)
        response = app.chat("confirmed", "hello")
        assert response.status_code == 200
        assert response.text == "echo: hello [turns=1]"
        with replica.client(decode_responses=True) as client:
            # WAIT returned once the replica held the turn: it is there already, no polling needed.
            [history] = client.keys("*confirmed*:history")
            assert len(client.lrange(history, 0, -1)) == 2
    finally:
        replica.kill()
        primary.stop()
