"""The Redis side of a turn, on a real Redis: lock, fencing, idempotent commit, expiry, cluster slots."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.crc import key_slot

from api.store.history import CommitRefused, SessionStore, stored_message
from api.store.keys import SessionKeys, session_keys
from api.store.scripts import Scripts

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[SessionStore]:
    client = Redis.from_url(redis_url)
    yield SessionStore(client, Scripts.register(client), ttl_seconds=60, max_messages=6, lock_ttl=0.5)
    await client.aclose()


def turn(n: int) -> list[bytes]:
    return [
        stored_message(f"u{n}", "user", f"q{n}", 0, 1),
        stored_message(f"a{n}", "assistant", f"r{n}", 0, 1),
    ]


async def read_all(store: SessionStore, keys: SessionKeys) -> list[bytes] | None:
    page = await store.read_page(keys, 1000, None)
    return None if page is None else page.messages


def contents(raw: list[bytes] | None) -> list[str]:
    return [orjson.loads(m)["content"] for m in raw or []]


async def test_one_turn_at_a_time_and_the_lock_expires(store: SessionStore, prefix: str) -> None:
    keys = session_keys(prefix, "t", "s")
    first = await store.begin(keys, "token-1")
    assert first is not None
    assert await store.begin(keys, "token-2") is None
    # A dead worker's lock frees the session after its ttl.
    await asyncio.sleep(0.6)
    assert await store.begin(keys, "token-3") is not None


async def test_a_resent_begin_keeps_the_lock_it_took(store: SessionStore, prefix: str) -> None:
    keys = session_keys(prefix, "t", "s")
    assert await store.begin(keys, "tok") is not None
    # The reply to the first send was lost and redis-py sent it again: still ours, not "busy".
    assert await store.begin(keys, "tok") is not None
    assert await store.begin(keys, "other") is None


async def test_commit_appends_both_messages_and_unlocks(
    store: SessionStore, prefix: str, rdb: sync_redis.Redis
) -> None:
    keys = session_keys(prefix, "t", "s")
    snapshot = await store.begin(keys, "tok")
    assert snapshot is not None and snapshot.version == 0 and snapshot.messages == []
    await store.commit(keys, snapshot, "tok", turn(1), replace_last=False)
    assert contents(await read_all(store, keys)) == ["q1", "r1"]
    assert not rdb.exists(keys.lock)
    assert 0 < rdb.pttl(keys.history) <= 60_000
    assert 0 < rdb.pttl(keys.meta) <= 60_000
    again = await store.begin(keys, "tok2")
    assert again is not None and again.version == 1
    assert [m["content"] for m in again.messages] == ["q1", "r1"]


async def test_a_resent_commit_is_applied_once(store: SessionStore, prefix: str) -> None:
    keys = session_keys(prefix, "t", "s")
    snapshot = await store.begin(keys, "tok")
    assert snapshot is not None
    await store.commit(keys, snapshot, "tok", turn(1), replace_last=False)
    # redis-py re-sends a command whose reply timed out: the same commit arrives twice.
    await store.commit(keys, snapshot, "tok", turn(1), replace_last=False)
    assert contents(await read_all(store, keys)) == ["q1", "r1"]


async def test_a_turn_that_lost_its_lock_cannot_write(store: SessionStore, prefix: str) -> None:
    keys = session_keys(prefix, "t", "s")
    stale = await store.begin(keys, "stale")
    assert stale is not None
    await asyncio.sleep(0.6)  # the stale worker stalls past its lock ttl
    fresh = await store.begin(keys, "fresh")
    assert fresh is not None
    with pytest.raises(CommitRefused):
        await store.commit(keys, stale, "stale", turn(1), replace_last=False)
    await store.commit(keys, fresh, "fresh", turn(2), replace_last=False)
    assert contents(await read_all(store, keys)) == ["q2", "r2"]
    # Nor can it release or renew someone else's lock.
    fresh_again = await store.begin(keys, "fresh-2")
    assert fresh_again is not None
    await stale.lock.release()
    assert not await stale.lock.renew()
    assert await store.begin(keys, "third") is None


async def test_the_version_fences_a_commit_after_the_history_changed(
    store: SessionStore, prefix: str, rdb: sync_redis.Redis
) -> None:
    keys = session_keys(prefix, "t", "s")
    snapshot = await store.begin(keys, "tok")
    assert snapshot is not None
    rdb.hset(keys.meta, "ver", 5)  # written meanwhile by something holding no lock
    with pytest.raises(CommitRefused):
        await store.commit(keys, snapshot, "tok", turn(1), replace_last=False)
    assert await read_all(store, keys) == []


async def test_deleting_a_session_mid_turn_makes_its_commit_fail(store: SessionStore, prefix: str) -> None:
    keys = session_keys(prefix, "t", "s")
    snapshot = await store.begin(keys, "tok")
    assert snapshot is not None
    await store.commit(keys, snapshot, "tok", turn(1), replace_last=False)
    in_flight = await store.begin(keys, "tok2")
    assert in_flight is not None
    assert await store.delete(keys)
    with pytest.raises(CommitRefused):
        await store.commit(keys, in_flight, "tok2", turn(2), replace_last=False)
    assert await read_all(store, keys) is None
    assert not await store.delete(keys)


async def test_regenerate_replaces_the_last_reply(store: SessionStore, prefix: str) -> None:
    keys = session_keys(prefix, "t", "s")
    for n, token in ((1, "a"), (2, "b")):
        snapshot = await store.begin(keys, token)
        assert snapshot is not None
        await store.commit(keys, snapshot, token, turn(n), replace_last=False)
    snapshot = await store.begin(keys, "c")
    assert snapshot is not None
    new_reply = [stored_message("a2b", "assistant", "r2-again", 0, 1)]
    await store.commit(keys, snapshot, "c", new_reply, replace_last=True)
    assert contents(await read_all(store, keys)) == ["q1", "r1", "q2", "r2-again"]


async def test_history_is_capped(store: SessionStore, prefix: str) -> None:
    keys = session_keys(prefix, "t", "s")
    for n in range(5):
        snapshot = await store.begin(keys, f"tok{n}")
        assert snapshot is not None
        await store.commit(keys, snapshot, f"tok{n}", turn(n), replace_last=False)
    assert contents(await read_all(store, keys)) == ["q2", "r2", "q3", "r3", "q4", "r4"]


async def test_session_expires_without_a_turn(redis_url: str, prefix: str) -> None:
    client = Redis.from_url(redis_url)
    store = SessionStore(client, Scripts.register(client), ttl_seconds=1, max_messages=10, lock_ttl=5)
    try:
        keys = session_keys(prefix, "t", "s")
        snapshot = await store.begin(keys, "tok")
        assert snapshot is not None
        await store.commit(keys, snapshot, "tok", turn(1), replace_last=False)
        assert await read_all(store, keys)
        await asyncio.sleep(1.3)
        assert await read_all(store, keys) is None
    finally:
        await client.aclose()


async def test_time_comes_from_redis(store: SessionStore, prefix: str, rdb: sync_redis.Redis) -> None:
    seconds, micros = rdb.time()
    snapshot = await store.begin(session_keys(prefix, "t", "s"), "tok")
    assert snapshot is not None
    assert abs(snapshot.now_ms - (seconds * 1000 + micros // 1000)) < 1000


async def test_scripts_are_reloaded_after_redis_forgets_them(
    store: SessionStore, prefix: str, rdb: sync_redis.Redis
) -> None:
    keys = session_keys(prefix, "t", "s")
    assert await store.begin(keys, "tok") is not None
    rdb.script_flush()  # what a Redis restart does to the script cache
    snapshot = await store.begin(session_keys(prefix, "t", "s2"), "tok")
    assert snapshot is not None
    await store.commit(session_keys(prefix, "t", "s2"), snapshot, "tok", turn(1), replace_last=False)


def test_a_sessions_keys_share_one_cluster_slot_and_sessions_spread() -> None:
    keys = session_keys("chat", "tenant", "abc")
    assert len({key_slot(k.encode()) for k in keys.all()}) == 1
    slots = {key_slot(session_keys("chat", "tenant", f"s{n}").history.encode()) for n in range(50)}
    assert len(slots) > 40


async def test_a_commit_whose_reply_was_lost_is_sent_again_and_applied_once(
    store: SessionStore, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.exceptions import TimeoutError as RedisTimeoutError

    import api.store.history

    keys = session_keys(prefix, "t", "s")
    snapshot = await store.begin(keys, "tok")
    assert snapshot is not None
    real = api.store.history.run_together
    sends = []

    async def reply_lost_once(
        redis: Redis, calls: list, confirm: object = None, bundle: object = None
    ) -> list:  # type: ignore[type-arg]
        results = await real(redis, calls, confirm, bundle)  # type: ignore[arg-type]  # Redis applied it...
        sends.append(results)
        if len(sends) == 1:
            raise RedisTimeoutError("Timeout reading from socket")  # ...but the reply never came
        return results

    monkeypatch.setattr(api.store.history, "run_together", reply_lost_once)
    await store.commit(keys, snapshot, "turn-1", turn(1), replace_last=False)
    assert len(sends) == 2  # sent again, recognised by its turn id
    assert contents(await read_all(store, keys)) == ["q1", "r1"]


async def test_a_redis_that_does_not_answer_times_out_each_call(redis_url: str) -> None:
    """Calls are bounded by CHAT_REDIS_TIMEOUT_SECONDS though the socket itself has no timeout."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from api.config import Settings
    from api.store.redis import make_redis

    handlers: list[asyncio.Task[None]] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await reader.read(65536)
            await asyncio.sleep(30)
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = Settings(
        anthropic_api_key="k", redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_seconds=0.3
    )
    client = make_redis(settings)
    # No socket timeout of redis-py's own (it defaults to one), which would cost a task per command.
    assert client.connection_pool.make_connection().socket_timeout is None
    try:
        loop = asyncio.get_running_loop()
        for call in (client.ping(), client.pipeline(transaction=False).get("x").execute()):
            started = loop.time()
            with pytest.raises(RedisTimeoutError):
                await call
            assert loop.time() - started < 2
    finally:
        await client.aclose(close_connection_pool=True)
        server.close()
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()
