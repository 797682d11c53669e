"""The Redis client every worker uses: one Redis, a master found through Sentinel, or a Redis Cluster.

Each call's time limit is enforced per call rather than per socket op. redis-py applies
`socket_timeout` to each write with `asyncio.wait_for`, which on Python 3.11 starts a task for every
command sent: about a tenth of a busy worker's CPU. Here the socket has no timeout and each command
or pipeline runs under `asyncio.timeout` instead, a timer and no task. A call cut by it raises
redis-py's own `TimeoutError`, and redis-py drops the connection it was using, so no late reply can
be read by the next call.

On a cluster the whole call is under the limit, the client's own retries after a failover (it
refreshes the slot map and asks the node that now holds the slot) included.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster, SSLConnection
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.connection import ConnectKwargs, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.config import Settings, host_port

log = logging.getLogger("api.store.redis")

# What every store module takes: both answer the same commands, scripts and pipelines.
Client: TypeAlias = "Redis | RedisCluster"


class TimedRedis(Redis):
    call_timeout: float = 5.0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            async with asyncio.timeout(self.call_timeout):
                return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except TimeoutError as exc:
            raise RedisTimeoutError(f"no reply from Redis within {self.call_timeout} s") from exc

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = TimedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.call_timeout = self.call_timeout
        return pipe


class TimedPipeline(Pipeline):
    call_timeout: float = 5.0

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            async with asyncio.timeout(self.call_timeout):
                return await super().execute(raise_on_error)
        except TimeoutError as exc:
            raise RedisTimeoutError(f"no reply from Redis within {self.call_timeout} s") from exc


class TimedRedisCluster(RedisCluster):
    call_timeout: float = 5.0

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(self.call_timeout):
                return await super().execute_command(*args, **kwargs)
        except TimeoutError as exc:
            raise RedisTimeoutError(f"no reply from Redis within {self.call_timeout} s") from exc

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        pipe = TimedClusterPipeline(self, transaction)  # type: ignore[abstract]
        pipe.call_timeout = self.call_timeout
        return pipe

    async def ping(self, **kwargs: Any) -> Any:
        """Every primary answers: a cluster with a shard away cannot serve that shard's sessions."""
        kwargs.setdefault("target_nodes", RedisCluster.PRIMARIES)
        return await self.execute_command("PING", **kwargs)


class TimedClusterPipeline(ClusterPipeline):
    call_timeout: float = 5.0

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        try:
            async with asyncio.timeout(self.call_timeout):
                return await super().execute(raise_on_error, allow_redirections)
        except TimeoutError as exc:
            raise RedisTimeoutError(f"no reply from Redis within {self.call_timeout} s") from exc


class SentinelBlockingPool(SentinelConnectionPool, BlockingConnectionPool):
    """The master's pool, found through Sentinel, that waits for a free connection as the single
    Redis's pool does (redis-py's own raises at once when all are in use)."""


def make_redis(settings: Settings) -> Client:
    if settings.redis_mode == "cluster":
        return _cluster(settings)
    if settings.redis_mode == "sentinel":
        return _sentinel(settings)
    pool = BlockingConnectionPool.from_url(settings.redis_url, **_pool_options(settings))
    client = TimedRedis(connection_pool=pool)
    client.call_timeout = settings.redis_timeout_seconds
    return client


def _pool_options(settings: Settings) -> dict[str, Any]:
    return {
        "max_connections": settings.redis_max_connections,
        "timeout": settings.redis_timeout_seconds,  # waiting for a free connection
        "socket_connect_timeout": min(2.0, settings.redis_timeout_seconds),
        # Said outright: redis-py 8 defaults to 5 s, and with any socket timeout every command
        # is sent through `asyncio.wait_for` (a task each) and read under a timer of its own.
        "socket_timeout": None,
        "health_check_interval": 30,
    }


def _url_options(url: str) -> dict[str, Any]:
    """REDIS_URL's credentials, db and TLS options, without its address."""
    options: ConnectKwargs = parse_url(url)
    found: dict[str, Any] = dict(options)
    found.pop("host", None)
    found.pop("port", None)
    found["ssl"] = found.pop("connection_class", None) is SSLConnection
    return found


def _sentinel(settings: Settings) -> Client:
    options = _url_options(settings.redis_url)
    tls = {key: value for key, value in options.items() if key.startswith("ssl")}
    password = settings.redis_sentinel_password
    sentinel_options: dict[str, Any] = {
        **tls,
        "socket_connect_timeout": min(2.0, settings.redis_timeout_seconds),
        # Asking a sentinel is rare (a new connection, a failover) and has no timer of ours around it.
        "socket_timeout": settings.redis_timeout_seconds,
    }
    if password is not None:
        sentinel_options["password"] = password.get_secret_value()
    sentinel = Sentinel(
        [host_port(node) for node in settings.redis_sentinels], sentinel_kwargs=sentinel_options
    )
    pool_options = _pool_options(settings)
    client = sentinel.master_for(
        settings.redis_sentinel_master,
        redis_class=TimedRedis,
        connection_pool_class=SentinelBlockingPool,
        **options,
        **pool_options,
    )
    assert isinstance(client, TimedRedis)
    client.call_timeout = settings.redis_timeout_seconds
    return client


def _cluster(settings: Settings) -> Client:
    options = _url_options(settings.redis_url)
    options.pop("db", None)
    url = urlsplit(settings.redis_url)
    assert url.hostname is not None  # the settings checked it
    seeds = [(url.hostname, url.port or 6379), *(host_port(node) for node in settings.redis_cluster_nodes)]
    client = TimedRedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in seeds],
        # Per node: the cluster's pools raise when all are in use, rather than wait.
        max_connections=settings.redis_max_connections,
        socket_connect_timeout=min(2.0, settings.redis_timeout_seconds),
        socket_timeout=None,
        health_check_interval=30,
        **options,
    )
    client.call_timeout = settings.redis_timeout_seconds
    return client


async def prepare(client: Client, sources: list[str], seconds: float) -> None:
    """At start-up: learn the cluster's slot map (before requests race to do it, redis-py #3935) and
    load every script on every node, replicas too, so that a promoted replica has them already.
    Best effort: a store that does not answer yet is retried by each call, and /readyz says so."""
    try:
        async with asyncio.timeout(seconds):
            if isinstance(client, RedisCluster):
                await client.initialize()
                for source in sources:
                    await client.execute_command("SCRIPT LOAD", source, target_nodes=RedisCluster.ALL_NODES)
            else:
                for source in sources:
                    await client.script_load(source)
    except (RedisError, TimeoutError, OSError):
        log.warning("Redis did not answer at start-up; each request will try again", exc_info=True)


async def close(client: Client) -> None:
    if isinstance(client, RedisCluster):
        await client.aclose()
    else:
        await client.aclose(close_connection_pool=True)
