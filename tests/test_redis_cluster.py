"""The service on a Redis Cluster of 3 primaries and 3 replicas, started by the test: sessions spread
over every primary, a turn's commit and its caller's limits (two slots) settled together, scripts
reloaded wherever they went missing, and a primary killed under load with its replica promoted.

The turn, admission and multi-worker suites run on a cluster too: `CHAT_REDIS_MODE=cluster` makes
the suite's own Redis a cluster (tests/conftest.py), and `python -m tests` runs them so.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from api.dev.standin import StandInModel
from tests.failover import Load, audit, figures, improper
from tests.processes import Worker, wait_until
from tests.topologies import Cluster

pytestmark = pytest.mark.slow

PREFIX = "cl"


@dataclass
class Deployment:
    cluster: Cluster
    worker: Worker


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, standin: StandInModel) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("cluster")
    cluster = Cluster(root)
    cluster.start()
    env = {
        "REDIS_URL": cluster.url,
        "CHAT_REDIS_MODE": "cluster",
        # More seeds than the first, should it be the one away when the worker starts.
        "CHAT_REDIS_CLUSTER_NODES": ",".join(node.address for node in cluster.nodes[1:3]),
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": standin.url,
        "CHAT_REDIS_PREFIX": PREFIX,
        "CHAT_REDIS_TIMEOUT_SECONDS": "1",
        "CHAT_LOCK_TTL_SECONDS": "3",
        # A limit every turn passes, so that every turn also admits and settles in its caller's slot.
        "CHAT_RATE_LIMIT_REQUESTS": "1000000",
        "CHAT_RATE_LIMIT_CONCURRENT": "1000",
    }
    worker = Worker(env, root / "worker.log")
    try:
        worker.start(60)
        yield Deployment(cluster, worker)
    finally:
        worker.stop()
        cluster.stop()


def turn(deployment: Deployment, session: str, message: str) -> httpx.Response:
    return httpx.post(f"{deployment.worker.url}/chat/{session}/stream", json={"message": message}, timeout=20)


def test_sessions_spread_over_every_primary_and_each_stays_whole(deployment: Deployment) -> None:
    sessions = [f"spread{n}" for n in range(24)]
    for session in sessions:
        for n in (1, 2):
            response = turn(deployment, session, f"turn {n}")
            assert response.status_code == 200, response.text
            assert response.text == f"echo: turn {n} [turns={n}]"
    held = {}
    for node in deployment.cluster.primaries():
        with node.client(decode_responses=True) as client:
            held[node.address] = len(list(client.scan_iter(f"{PREFIX}:{{*spread*}}:history")))
    assert len(held) == 3
    assert all(count > 0 for count in held.values()), held
    assert sum(held.values()) == len(sessions)
    for session in sessions:
        stored = httpx.get(f"{deployment.worker.url}/chat/{session}/messages", timeout=5).json()["messages"]
        assert [m["content"] for m in stored] == [
            "turn 1", "echo: turn 1 [turns=1]", "turn 2", "echo: turn 2 [turns=2]",
        ]  # fmt: skip


def test_scripts_flushed_from_every_node_are_loaded_again_where_needed(deployment: Deployment) -> None:
    for node in deployment.cluster.nodes:
        if node.proc is not None:
            with node.client() as client:
                client.script_flush()
    # The commit (the session's slot) and the settle (the caller's) meet NOSCRIPT together.
    for n in range(6):
        response = turn(deployment, f"flushed{n}", "hello")
        assert response.status_code == 200, response.text
    assert httpx.get(f"{deployment.worker.url}/readyz", timeout=5).status_code == 200


@pytest.mark.timeout(150)
def test_a_primary_killed_under_load_fails_over_to_its_replica_without_a_worker_restart(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, worker = deployment.cluster, deployment.worker
    pid = worker.proc.pid if worker.proc is not None else None
    load = Load(worker.url, 20, "cf")
    try:
        load.start()
        load.wait_for(lambda r: r.completed, 60, 60, "60 turns before the kill")
        # A primary other than the seed REDIS_URL names, holding some of the load's sessions.
        victim = next(node for node in cluster.primaries() if node is not cluster.nodes[0])
        probe = next(
            r.session for r in list(load.results) if cluster.node_of(f"{PREFIX}:{{x.{r.session}}}") is victim
        )
        key = f"{PREFIX}:{{x.{probe}}}"
        killed_at = time.monotonic()
        victim.kill(signal.SIGKILL)
        wait_until(
            lambda: cluster.node_of(key) is not victim, 30, "a replica to take over the killed primary"
        )
        promoted_at = time.monotonic()
        load.wait_for(
            lambda r: r.completed and r.started >= promoted_at, 1, 10, "a turn begun after the promotion"
        )
        recovered_at = min(r.ended for r in load.results if r.completed and r.started >= promoted_at)
        done = load.count(lambda r: r.completed)
        load.wait_for(lambda r: r.completed, done + 60, 60, "60 turns after the promotion")
    finally:
        load.stop()
    assert worker.proc is not None and worker.proc.pid == pid and worker.alive
    wait_until(
        lambda: httpx.get(f"{worker.url}/readyz", timeout=2).status_code == 200, 10, "the worker to be ready"
    )
    found = audit(load.results, worker.url)
    with capsys.disabled():
        print()
        for line in figures(
            "Cluster primary kill -9",
            load.results,
            found,
            promotion_after_kill=promoted_at - killed_at,
            first_turn_after_promotion=recovered_at - promoted_at,
        ):
            print(line)
    assert improper(load.results) == []
    assert found.broken == []
