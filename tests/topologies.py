"""Real Redis topologies on loopback for the tests: a Redis Cluster (3 primaries, 3 replicas) and a
Sentinel set (a master, two replicas, three sentinels). Every process is a `redis-server` of the
test's own, in a temporary directory, started with a bounded wait and stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from tests.processes import free_port, stop_process, wait_until

# A primary waits five seconds by default for more replicas before it serves a first full sync; a
# topology of the tests' own starts its replicas together, and has nobody else to wait for.
NO_SYNC_DELAY = ["--repl-diskless-sync-delay", "0"]


def cluster_port() -> int:
    """A free port whose cluster bus port (10000 above it) is free too."""
    for _ in range(200):
        port = free_port()
        if port <= 55535:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


def suite_mode() -> str:
    """The topology the suite's Redis has: CHAT_REDIS_MODE, as the service reads it."""
    return os.environ.get("CHAT_REDIS_MODE", "single")


def store_client(url: str, **options: Any) -> redis.Redis:
    """A synchronous client for the suite's Redis, whichever its topology: on a cluster it scans every
    primary and sends each key to its node. Typed as a plain client, whose commands it answers."""
    if suite_mode() == "cluster":
        return RedisCluster.from_url(url, socket_timeout=5, **options)  # type: ignore[return-value]
    return redis.Redis.from_url(url, socket_timeout=5, **options)


@contextlib.contextmanager
def own_prefix(url: str) -> Iterator[str]:
    """A key prefix of its own in the suite's Redis, so that users of one Redis do not see each other's
    keys; every key under it is deleted afterwards."""
    name = "t" + uuid.uuid4().hex[:12]
    yield name
    client = store_client(url)
    try:
        for key in list(client.scan_iter(f"{name}:*", count=1000)):
            client.delete(key)
    finally:
        client.close()


def require_redis_tools() -> tuple[str, str]:
    """redis-server and redis-cli from PATH: skipped without them, but a failure in CI."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server and redis-cli are required in CI (.ci/run installs redis-server)")
        pytest.skip("redis-server and redis-cli are not installed (apt-get install redis-server)")
    return server, cli


class Node:
    """One redis-server on a loopback port, with its own directory; it may be killed and restarted."""

    def __init__(
        self, binary: str, work_dir: Path, extra: Sequence[str] = (), port: int | None = None
    ) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.work_dir = work_dir
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2, **options)

    def launch(self, *args: str) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = (self.work_dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, *args, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.work_dir),
             "--save", "", *self.extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()

    def wait_ready(self, timeout: float = 10) -> None:
        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on {self.port} exited: {self.log_text()[-1500:]}")
            with self.client() as client:
                return bool(client.ping())

        wait_until(answers, timeout, f"redis-server on port {self.port}")

    def start(self, *args: str) -> None:
        self.launch(*args)
        self.wait_ready()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig=sig)
            self.proc = None

    def log_text(self) -> str:
        path = self.work_dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Cluster:
    """Three primaries and three replicas, made by `redis-cli --cluster create`. A short node timeout
    lets a replica take over a killed primary in a second or two."""

    NODE_TIMEOUT_MS = 1000

    def __init__(self, work_dir: Path, size: int = 6, replicas: int = 1) -> None:
        server, self.cli = require_redis_tools()
        self.replicas = replicas
        options = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                   "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS), "--appendonly", "no",
                   *NO_SYNC_DELAY]  # fmt: skip
        self.nodes = [Node(server, work_dir / f"node{n}", options, port=cluster_port()) for n in range(size)]

    @property
    def url(self) -> str:
        return f"redis://{self.nodes[0].address}"

    def client(self) -> RedisCluster:
        return RedisCluster.from_url(self.url, decode_responses=True, socket_timeout=2)

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_ready()
        subprocess.run(
            [self.cli, "--cluster", "create", *(node.address for node in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        wait_until(self.healthy, 30, "the cluster to cover every slot on every node")

    def healthy(self) -> bool:
        for node in self.nodes:
            if node.proc is None:
                continue
            with node.client(decode_responses=True) as client:
                if client.cluster("info")["cluster_state"] != "ok":  # type: ignore[index]
                    return False
        return True

    def primaries(self) -> list[Node]:
        """The live nodes that are primaries now, as the nodes themselves say."""
        found = []
        for node in self.nodes:
            if node.proc is None:
                continue
            with node.client(decode_responses=True) as client:
                if client.info("replication")["role"] == "master":
                    found.append(node)
        return found

    def node_of(self, key: str) -> Node:
        """The node that serves `key`'s slot now, as a live node's slot map says."""
        with self.primaries()[0].client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return next(node for node in self.nodes if node.port == int(primary[1]))
        raise LookupError(f"no node serves {key!r}")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill(signal.SIGTERM)


class SentinelSet:
    """A master, two replicas and three sentinels watching it as `service`; a sentinel gives the master
    up after `down_after_ms` without a reply, and two of them must agree."""

    def __init__(self, work_dir: Path, service: str = "chat", down_after_ms: int = 1000) -> None:
        server, _ = require_redis_tools()
        self.service = service
        self.work_dir = work_dir
        self.down_after_ms = down_after_ms
        self.servers = [
            Node(server, work_dir / f"redis{n}", ["--appendonly", "no", *NO_SYNC_DELAY]) for n in range(3)
        ]
        self.sentinels = [Node(server, work_dir / f"sentinel{n}") for n in range(3)]

    @property
    def sentinel_addresses(self) -> str:
        return ",".join(s.address for s in self.sentinels)

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        master = self.servers[0]
        master.start()
        for replica in self.servers[1:]:
            replica.start("--replicaof", "127.0.0.1", str(master.port))
        for sentinel in self.sentinels:
            conf = sentinel.work_dir / "sentinel.conf"
            sentinel.work_dir.mkdir(parents=True, exist_ok=True)
            conf.write_text(
                f"sentinel monitor {self.service} 127.0.0.1 {master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} 10000\n"
                f"sentinel parallel-syncs {self.service} 2\n"
            )
            sentinel.launch(str(conf), "--sentinel")
        for sentinel in self.sentinels:
            sentinel.wait_ready()
        wait_until(self.settled, 30, "the sentinels to know each other and both replicas")

    def settled(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client(decode_responses=True) as client:
                info = client.sentinel_master(self.service)
                if int(info["num-other-sentinels"]) != 2 or int(info["num-slaves"]) != 2:
                    return False
        with self.master().client(decode_responses=True) as client:
            return int(client.info("replication")["connected_slaves"]) == 2

    def master_address(self) -> str:
        for sentinel in self.sentinels:
            if sentinel.proc is None:
                continue
            with sentinel.client(decode_responses=True) as client:
                host, port = client.sentinel_get_master_addr_by_name(self.service)
                return f"{host}:{port}"
        raise LookupError("no sentinel answers")

    def master(self) -> Node:
        address = self.master_address()
        return next(node for node in self.servers if node.address == address)

    def stop(self) -> None:
        for node in [*self.sentinels, *self.servers]:
            node.kill(signal.SIGTERM)
