"""The Redis client every worker uses, with its time limit enforced per call rather than per socket op.

redis-py applies `socket_timeout` to each write with `asyncio.wait_for`, which on Python 3.11 starts
a task for every command sent: about a tenth of a busy worker's CPU. Here the socket has no timeout
and each command or pipeline runs under `asyncio.timeout` instead, a timer and no task. A call cut
by it raises redis-py's own `TimeoutError`, and redis-py drops the connection it was using, so no
late reply can be read by the next call.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.config import Settings


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


def make_redis(settings: Settings) -> Redis:
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_seconds,  # waiting for a free connection
        socket_connect_timeout=min(2.0, settings.redis_timeout_seconds),
        # Said outright: redis-py 8 defaults to 5 s, and with any socket timeout every command
        # is sent through `asyncio.wait_for` (a task each) and read under a timer of its own.
        socket_timeout=None,
        health_check_interval=30,
    )
    client = TimedRedis(connection_pool=pool)
    client.call_timeout = settings.redis_timeout_seconds
    return client
