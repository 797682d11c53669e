"""The topology settings: checked at start with a message naming the setting, and turned into the
right client for each mode, with TLS wherever REDIS_URL says rediss://."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from redis.asyncio import RedisCluster, SSLConnection
from redis.asyncio.sentinel import SentinelManagedSSLConnection

from api.config import Settings, describe_error
from api.store.redis import SentinelBlockingPool, TimedRedis, TimedRedisCluster, make_redis

SENTINEL = {
    "redis_mode": "sentinel",
    "redis_sentinels": "10.0.0.1:26379, 10.0.0.2:26379",
    "redis_sentinel_master": "chat",
}


def settings(**values: Any) -> Settings:
    return Settings(anthropic_api_key="k", **values)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"redis_mode": "sentinels"}, "CHAT_REDIS_MODE"),
        ({"redis_mode": "sentinel"}, "CHAT_REDIS_SENTINELS"),
        ({"redis_mode": "sentinel", "redis_sentinels": "a:1"}, "CHAT_REDIS_SENTINEL_MASTER"),
        ({**SENTINEL, "redis_sentinels": "a:1,b"}, "CHAT_REDIS_SENTINELS"),
        ({**SENTINEL, "redis_sentinels": "a:99999"}, "CHAT_REDIS_SENTINELS"),
        ({**SENTINEL, "redis_url": "unix:///run/redis.sock"}, "REDIS_URL"),
        ({"redis_sentinels": "a:1"}, "CHAT_REDIS_MODE=sentinel"),
        ({"redis_mode": "cluster", "redis_url": "redis://a:7000/2"}, "REDIS_URL"),
        ({"redis_mode": "cluster", "redis_cluster_nodes": "b:7000,c"}, "CHAT_REDIS_CLUSTER_NODES"),
        ({"redis_cluster_nodes": "b:7000"}, "CHAT_REDIS_MODE=cluster"),
        ({"redis_wait_replicas": -1}, "CHAT_REDIS_WAIT_REPLICAS"),
    ],
)
def test_a_bad_topology_setting_is_named_at_start(values: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError) as caught:
        settings(**values)
    assert named in describe_error(caught.value)


def test_settings_read_the_documented_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_REDIS_MODE", "sentinel")
    monkeypatch.setenv("CHAT_REDIS_SENTINELS", "s1:26379,[::1]:26380")
    monkeypatch.setenv("CHAT_REDIS_SENTINEL_MASTER", "chat")
    monkeypatch.setenv("CHAT_REDIS_SENTINEL_PASSWORD", "sentinel-secret")
    monkeypatch.setenv("CHAT_REDIS_WAIT_REPLICAS", "1")
    found = settings()
    assert found.redis_sentinels == ["s1:26379", "[::1]:26380"]
    assert found.redis_sentinel_password is not None
    assert found.redis_wait_replicas == 1
    assert "sentinel-secret" not in repr(found)


def test_single_mode_uses_tls_for_rediss() -> None:
    client = make_redis(settings(redis_url="rediss://:pw@cache.example:6380/3"))
    assert isinstance(client, TimedRedis)
    pool = client.connection_pool
    assert pool.connection_class is SSLConnection
    assert pool.connection_kwargs["db"] == 3


def test_sentinel_mode_finds_the_master_through_every_sentinel_with_tls_and_passwords() -> None:
    client = make_redis(
        settings(redis_url="rediss://:master-pw@ignored:6379/2", redis_sentinel_password="s-pw", **SENTINEL)
    )
    assert isinstance(client, TimedRedis)
    pool = client.connection_pool
    assert isinstance(pool, SentinelBlockingPool)
    assert pool.service_name == "chat"
    assert pool.connection_class is SentinelManagedSSLConnection
    assert pool.connection_kwargs["password"] == "master-pw"
    assert pool.connection_kwargs["db"] == 2
    sentinels = pool.sentinel_manager.sentinels
    assert [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in sentinels] == [("10.0.0.1", 26379), ("10.0.0.2", 26379)]  # fmt: skip
    for sentinel in sentinels:
        assert sentinel.connection_pool.connection_kwargs["password"] == "s-pw"
        assert sentinel.connection_pool.connection_class.__name__ == "SSLConnection"


def test_cluster_mode_seeds_from_every_node_named_with_tls() -> None:
    client = make_redis(
        settings(redis_mode="cluster", redis_url="rediss://:pw@a:7000", redis_cluster_nodes="b:7001,c:7002")
    )
    assert isinstance(client, TimedRedisCluster)
    assert isinstance(client, RedisCluster)
    seeds = client.nodes_manager.startup_nodes
    assert sorted(seeds) == ["a:7000", "b:7001", "c:7002"]
    for node in seeds.values():
        assert node.connection_class is SSLConnection
        assert node.connection_kwargs["password"] == "pw"
