"""Several real `chat-api serve` processes enforce each key's limits as one, on one Redis."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from api.dev.standin import StandInModel
from api.http.auth import tenant_of
from api.store.keys import tenant_key
from tests.processes import Worker, wait_until, worker_env, workers
from tests.topologies import own_prefix

pytestmark = pytest.mark.slow

KEY_BURST = "burst-key-0123456789abcdef"
KEY_TOKENS = "tokens-key-0123456789abcdef"
KEY_QUIET = "quiet-key-0123456789abcdef"
KEY_DIGEST = "digest-key-0123456789abcdef"  # configured by its digest only
ALL_KEYS = (KEY_BURST, KEY_TOKENS, KEY_QUIET, KEY_DIGEST)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Deployment:
    def __init__(self, workers: list[Worker], prefix: str) -> None:
        self.workers = workers
        self.prefix = prefix


@pytest.fixture(scope="module")
def three_workers(
    redis_url: str, standin: StandInModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    with own_prefix(redis_url) as prefix:
        env = worker_env(
            redis_url,
            standin.url,
            prefix,
            CHAT_API_KEYS=f"{KEY_BURST},{KEY_TOKENS},{KEY_QUIET},sha256:{sha256_hex(KEY_DIGEST)}",
            CHAT_RATE_LIMIT_REQUESTS="20",
            CHAT_RATE_LIMIT_TOKENS="600",
            # The most a log could ever say, for the test that looks for keys in it.
            CHAT_LOG_LEVEL="debug",
            CHAT_LOG_FORMAT="json",
        )
        with workers(3, env, tmp_path_factory.mktemp("logs")) as started:
            yield Deployment(started, prefix)


def test_three_workers_admit_exactly_the_limit_of_300_concurrent_requests(
    three_workers: Deployment,
) -> None:
    workers = three_workers.workers

    async def burst(count: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        f"{workers[n % 3].url}/chat/stream",
                        json={"message": f"hello {n}"},
                        headers={"authorization": f"Bearer {KEY_BURST}"},
                    )
                    for n in range(count)
                )
            )

    began = time.monotonic()
    responses = asyncio.run(burst(300))
    took = time.monotonic() - began
    admitted = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    print(f"300 concurrent requests on 3 workers: {len(admitted)} admitted in {took:.2f} s")
    assert len(admitted) == 20
    assert len(limited) == 280
    assert all(r.json()["error"]["type"] == "rate_limited" for r in limited)
    # Every admitted request saw a different count left: no two workers handed out the same unit.
    assert sorted(int(r.headers["ratelimit-remaining"]) for r in admitted) == list(range(20))
    assert {r.headers["ratelimit-limit"] for r in responses} == {"20"}
    # One request frees every 60/20 = 3 s, so nobody is told to wait longer than that.
    waits = [int(r.headers["retry-after"]) for r in limited]
    assert all(1 <= wait <= 3 for wait in waits)

    # The window reopens as documented: after Retry-After, one request (and only one) gets through.
    refused = httpx.post(
        f"{workers[0].url}/chat/stream", json={"message": "again"}, headers={"x-api-key": KEY_BURST}
    )
    assert refused.status_code == 429
    time.sleep(int(refused.headers["retry-after"]) + 0.1)
    later = asyncio.run(burst(6))
    assert sorted(r.status_code for r in later) == [200] + [429] * 5


def test_tokens_per_minute_are_charged_for_every_turn_that_ran(
    three_workers: Deployment, rdb: sync_redis.Redis, standin: StandInModel
) -> None:
    """600 tokens a minute; each turn sends ~100 input tokens. What stops the fourth turn is only what
    the failed and the abandoned turns used."""
    workers = three_workers.workers
    auth = {"x-api-key": KEY_TOKENS}
    filler = "x" * 400

    def turn(worker: Worker, message: str) -> httpx.Response:
        return httpx.post(f"{worker.url}/chat/stream", json={"message": message}, headers=auth, timeout=20)

    # 1. A whole reply: ~100 in, 100 out.
    assert turn(workers[0], f"{filler} @@deltas=100").status_code == 200
    # 2. A reply that fails after 100 deltas: the text streamed so far was paid for.
    with httpx.stream(
        "POST",
        f"{workers[1].url}/chat/stream",
        json={"message": f"{filler} @@deltas=300 @@error_after=100"},
        headers=auth,
        timeout=20,
    ) as failing:
        assert failing.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            failing.read()
    # 3. A reply the client walks away from after ~1,200 bytes (~300 tokens) of a long answer.
    cancelled = standin.streams_cancelled
    received = 0
    with httpx.stream(
        "POST",
        f"{workers[2].url}/chat/stream",
        json={"message": f"{filler} @@deltas=5000 @@delay=0.001"},
        headers=auth,
        timeout=20,
    ) as abandoned:
        assert abandoned.status_code == 200
        for chunk in abandoned.iter_raw():
            received += len(chunk)
            if received >= 1200:
                break
    wait_until(lambda: standin.streams_cancelled > cancelled, 5, "the abandoned stream to be closed")
    leases = tenant_key(
        three_workers.prefix, tenant_of(hashlib.sha256(KEY_TOKENS.encode()).digest()), "streams"
    )
    wait_until(lambda: rdb.zcard(leases) == 0, 5, "the abandoned turn to be settled")

    # 4. Over the limit now, on any worker, for this key only.
    for worker in workers:
        refused = turn(worker, "one more")
        assert refused.status_code == 429, refused.text
        assert "tokens per minute" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 5
    assert turn(workers[0], "hi").status_code == 429
    assert (
        httpx.post(
            f"{workers[0].url}/chat/stream", json={"message": "hi"}, headers={"x-api-key": KEY_QUIET}
        ).status_code
        == 200
    )


def test_no_key_appears_in_any_log_line_or_in_redis(three_workers: Deployment, rdb: sync_redis.Redis) -> None:
    workers = three_workers.workers
    for worker in workers:
        url = worker.url
        for key in (KEY_QUIET, KEY_DIGEST):
            for headers in ({"authorization": f"Bearer {key}"}, {"x-api-key": key}):
                turn = httpx.post(
                    f"{url}/chat/leak/stream", json={"message": "hi"}, headers=headers, timeout=10
                )
                assert turn.status_code == 200
                assert httpx.get(f"{url}/chat/leak/messages", headers=headers).status_code == 200
                assert httpx.post(f"{url}/sessions", headers=headers).status_code == 201
            near_miss = key[:-1] + "!"
            assert httpx.get(f"{url}/chat/leak/messages", headers={"x-api-key": near_miss}).status_code == 401
            assert (
                httpx.post(f"{url}/chat/stream", json={}, headers={"x-api-key": near_miss}).status_code == 401
            )
    assert httpx.delete(f"{workers[0].url}/chat/leak", headers={"x-api-key": KEY_QUIET}).status_code == 204
    secrets = [*ALL_KEYS, *(key[:-1] + "!" for key in ALL_KEYS), *(sha256_hex(key) for key in ALL_KEYS)]

    logs = {worker.log_path.name: worker.log_text() for worker in workers}
    assert all('"outcome":' in text for text in logs.values())  # every worker logged turns to search
    for name, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"a key (or its digest) in {name}"

    stored: list[str] = []
    for name in rdb.scan_iter(f"{three_workers.prefix}:*"):
        stored.append(name)
        kind = rdb.type(name)
        if kind == "string":
            stored.append(str(rdb.get(name)))
        elif kind == "hash":
            stored.extend(f"{k}={v}" for k, v in rdb.hgetall(name).items())
        elif kind == "list":
            stored.extend(rdb.lrange(name, 0, -1))
        elif kind == "zset":
            stored.extend(str(m) for m in rdb.zrange(name, 0, -1, withscores=True))
    assert any(":limits" in name for name in stored)  # the limits live there, under some name
    dump = "\n".join(stored)
    for secret in secrets:
        assert secret not in dump


@pytest.fixture
def two_streaming_workers(redis_url: str, standin: StandInModel, tmp_logs: Path) -> Iterator[list[Worker]]:
    with own_prefix(redis_url) as prefix:
        env = worker_env(
            redis_url,
            standin.url,
            prefix,
            CHAT_API_KEYS=f"{KEY_BURST},{KEY_QUIET}",
            CHAT_RATE_LIMIT_CONCURRENT="2",
            CHAT_LOCK_TTL_SECONDS="2",  # the lease time, too
            CHAT_DRAIN_SECONDS="1",
        )
        with workers(2, env, tmp_logs) as started:
            yield started


def test_concurrent_streams_per_key_and_a_dead_workers_lease_expires(
    two_streaming_workers: list[Worker],
) -> None:
    first, second = two_streaming_workers
    busy = {"x-api-key": KEY_BURST}
    streaming = [threading.Event(), threading.Event()]
    done = threading.Event()

    def long_stream(worker: Worker, index: int) -> None:
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.stream(
                "POST",
                f"{worker.url}/chat/stream",
                json={"message": "@@deltas=100 @@delay=0.05"},
                headers=busy,
                timeout=20,
            ) as response,
        ):
            for _ in response.iter_raw():
                streaming[index].set()
                if done.is_set():
                    break

    threads = [threading.Thread(target=long_stream, args=(w, n)) for n, w in enumerate((first, second))]
    for thread in threads:
        thread.start()
    assert all(event.wait(10) for event in streaming)

    def short(worker: Worker, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(f"{worker.url}/chat/stream", json={"message": "hi"}, headers=headers, timeout=10)

    # Two streams of this key run (one per worker): a third is refused everywhere; another key is not.
    for worker in (first, second):
        refused = short(worker, busy)
        assert refused.status_code == 429
        assert "streaming at once" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "1"
        assert short(worker, {"x-api-key": KEY_QUIET}).status_code == 200

    # The second worker dies mid-stream. Its lease frees itself within the lease time (2 s).
    second.kill(signal.SIGKILL)
    killed = time.monotonic()
    assert short(first, busy).status_code == 429
    wait_until(lambda: short(first, busy).status_code == 200, 5, "the dead worker's lease to expire")
    assert time.monotonic() - killed < 3.0
    assert threads[0].is_alive()  # the live stream still holds its lease: only the dead one expired
    done.set()
    for thread in threads:
        thread.join(10)
