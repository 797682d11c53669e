"""Admission on a real Redis: exact limits, their headers, leases given back on every path, worker slots,
the body limit on a real socket, and what happens when Redis is gone."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest
import redis as sync_redis

from api.config import Settings
from api.dev.standin import StandInModel
from api.outcomes import Outcome
from api.store.admission import Admission
from api.store.keys import session_keys
from api.store.redis import make_redis
from api.store.scripts import Scripts
from api.store.usage import TurnUsage
from tests.conftest import LiveApp
from tests.test_requests import assert_error

StartApp = Callable[..., LiveApp]


@pytest.fixture
async def admission_for(
    redis_url: str, make_settings: Callable[..., Settings]
) -> AsyncIterator[Callable[..., Admission]]:
    client = make_redis(make_settings())
    scripts = Scripts.register(client)
    yield lambda **limits: Admission(client, scripts, make_settings(**limits))
    await client.aclose(close_connection_pool=True)


def limit_headers(response: httpx.Response) -> tuple[int, int, int]:
    h = response.headers
    return int(h["ratelimit-limit"]), int(h["ratelimit-remaining"]), int(h["ratelimit-reset"])


@pytest.mark.anyio
async def test_concurrent_requests_are_admitted_exactly_up_to_the_limit(
    admission_for: Callable[..., Admission],
) -> None:
    admission = admission_for(rate_limit_requests=5, rate_limit_tokens=1000, rate_limit_concurrent=50)
    decisions = await asyncio.gather(*(admission.admit("k") for _ in range(100)))
    admitted = [d for d in decisions if d.allowed]
    assert len(admitted) == 5
    # Each admitted request saw a different count left: no two took the same unit.
    assert sorted(d.quota.remaining for d in admitted if d.quota) == [0, 1, 2, 3, 4]
    refused = [d for d in decisions if not d.allowed]
    assert {d.message.split(";")[0] for d in refused} == {"over the limit of 5 requests per minute"}
    assert {d.retry_after for d in refused} == {12}  # one request frees every 60/5 s
    # Another caller has limits of its own.
    assert (await admission.admit("other")).allowed


@pytest.mark.anyio
async def test_the_window_frees_one_request_every_minute_over_the_limit(
    admission_for: Callable[..., Admission],
) -> None:
    admission = admission_for(rate_limit_requests=120)  # a full bucket of 120, one back every 0.5 s
    decisions = await asyncio.gather(*(admission.admit("k") for _ in range(130)))
    assert sum(d.allowed for d in decisions) == 120
    refused = await admission.admit("k")
    assert not refused.allowed and refused.retry_after == 1
    assert refused.quota is not None and refused.quota.remaining == 0 and refused.quota.reset_seconds == 1
    await asyncio.sleep(0.55)
    again = await asyncio.gather(*(admission.admit("k") for _ in range(5)))
    assert sum(d.allowed for d in again) == 1


@pytest.mark.anyio
async def test_a_refused_request_takes_nothing_from_any_limit(
    admission_for: Callable[..., Admission], rdb: sync_redis.Redis, prefix: str
) -> None:
    admission = admission_for(rate_limit_requests=10, rate_limit_concurrent=1)
    first = await admission.admit("k")
    assert first.allowed and first.quota is not None and first.quota.remaining == 9
    for _ in range(5):
        refused = await admission.admit("k")
        assert not refused.allowed and refused.message.startswith("over the limit of 1 replies streaming")
    assert first.ticket is not None
    await admission.settle_call(first.ticket, None).run()
    second = await admission.admit("k")
    assert second.allowed and second.quota is not None and second.quota.remaining == 8
    # Looking takes nothing either.
    assert await admission.peek("k") == await admission.peek("k")


@pytest.mark.anyio
async def test_a_resent_admission_or_settlement_counts_once(admission_for: Callable[..., Admission]) -> None:
    """redis-py re-sends a command after a timeout; the request may already have been admitted."""
    admission = admission_for(rate_limit_requests=10, rate_limit_tokens=100)
    decision = await admission.admit("k")
    assert decision.ticket is not None
    ticket = decision.ticket
    args = ["1", ticket.lease, 10, 100, 0, 5000, 60_000]
    resent = await admission.scripts.admit(keys=ticket.keys, args=args)
    assert resent[0] == 1 and resent[3] == 9  # admitted, and still only one request taken
    assert await admission.settle_call(ticket, TurnUsage("m", 50, 10)).run() == 1
    assert await admission.settle_call(ticket, TurnUsage("m", 50, 10)).run() == 0
    assert (await admission.admit("k")).allowed  # 60 of 100 tokens used, not 120


JSON_BODY = {"content-type": "application/json"}


def test_every_chat_response_carries_the_request_limit(live_app: StartApp) -> None:
    app = live_app(rate_limit_requests=3, max_body_bytes=1024)
    first = app.chat("h", "one")
    assert first.status_code == 200 and limit_headers(first) == (3, 2, 20)
    with app.client.stream("POST", "/chat/h/stream", json={"message": "@@deltas=5 @@delay=0.1"}) as slow:
        assert limit_headers(slow)[:2] == (3, 1)
        busy = app.chat("h", "meanwhile")
        assert busy.status_code == 409 and limit_headers(busy)[:2] == (3, 0)
        slow.read()
    # Refused before admission (nothing taken): the headers still tell where the caller stands.
    for response in (
        app.client.post("/chat/h/stream", json={"message": ""}),
        app.client.post("/chat/h/stream", content=b"{not json", headers=JSON_BODY),
        app.client.post("/chat/h/stream", content=b"x" * 2000, headers=JSON_BODY),
    ):
        assert response.status_code in (400, 413, 422)
        assert limit_headers(response)[:2] == (3, 0)
    limited = app.chat("h", "four")
    assert_error(limited, 429, "rate_limited")
    assert limit_headers(limited)[:2] == (3, 0)
    # Retry-After and RateLimit-Reset agree: both say when the next request is free.
    assert 1 <= int(limited.headers["retry-after"]) <= 20
    assert int(limited.headers["retry-after"]) == limit_headers(limited)[2]
    assert sorted(r.status for r in app.wait_reports(7)) == [200, 200, 400, 409, 413, 422, 429]


def test_no_limit_headers_without_a_request_limit(live_app: StartApp) -> None:
    response = live_app(rate_limit_tokens=1000).chat(None, "hi")
    assert response.status_code == 200
    assert not any(name.startswith("ratelimit") for name in response.headers)


def _disconnect_mid_stream(app: LiveApp, session: str | None) -> None:
    path = f"/chat/{session}/stream" if session else "/chat/stream"
    with app.client.stream("POST", path, json={"message": "@@deltas=200 @@delay=0.02"}) as response:
        assert response.status_code == 200
        next(response.iter_raw())


def _disconnect_before_streaming(app: LiveApp, session: str | None) -> None:
    path = f"/chat/{session}/stream" if session else "/chat/stream"
    with app.send_chat(path, "x @@first_delay=5"):
        time.sleep(0.3)


def _cut_mid_stream(app: LiveApp, session: str | None) -> None:
    with (
        pytest.raises(httpx.RemoteProtocolError),
        app.client.stream(
            "POST",
            f"/chat/{session}/stream" if session else "/chat/stream",
            json={"message": "x @@error_after=2"},
        ) as response,
    ):
        response.read()


@pytest.mark.parametrize(
    "end",
    [
        pytest.param(lambda app, s: app.chat(s, "fine"), id="success"),
        pytest.param(lambda app, s: app.chat(s, "x @@status=400"), id="upstream-refused"),
        pytest.param(lambda app, s: app.chat(s, "x @@error_after=0"), id="failed-before-first-byte"),
        pytest.param(_cut_mid_stream, id="cut-mid-stream"),
        pytest.param(_disconnect_mid_stream, id="client-left-mid-stream"),
        pytest.param(_disconnect_before_streaming, id="client-left-before-streaming"),
    ],
)
@pytest.mark.parametrize("session", ["s", None], ids=["session", "one-shot"])
def test_the_stream_slot_is_given_back_on_every_exit_path(
    live_app: StartApp, end: Callable[[LiveApp, str | None], Any], session: str | None
) -> None:
    app = live_app(rate_limit_concurrent=1, rate_limit_tokens=10**6)
    end(app, session)
    app.wait_reports(1)
    # With one stream allowed, the next turn is admitted at once: the slot did not wait for its lease.
    response = app.chat(session, "next")
    assert response.status_code == 200, response.text


def test_a_second_stream_is_refused_and_another_key_is_not(live_app: StartApp) -> None:
    keys = "key-a-0123456789abcdef,key-b-0123456789abcdef"
    app = live_app(api_keys=keys, rate_limit_concurrent=1)
    a = {"x-api-key": "key-a-0123456789abcdef"}
    b = {"x-api-key": "key-b-0123456789abcdef"}
    with app.client.stream(
        "POST", "/chat/stream", json={"message": "@@deltas=10 @@delay=0.1"}, headers=a
    ) as r:
        assert r.status_code == 200
        refused = app.client.post("/chat/other/stream", json={"message": "hi"}, headers=a)
        assert_error(refused, 429, "rate_limited")
        assert refused.headers["retry-after"] == "1"
        assert app.client.post("/chat/stream", json={"message": "hi"}, headers=b).status_code == 200
        r.read()
    assert app.client.post("/chat/stream", json={"message": "hi"}, headers=a).status_code == 200


def test_worker_slots_bound_generations_and_the_wait(live_app: StartApp) -> None:
    app = live_app(worker_max_streams=1, worker_queue_seconds=1.0, rate_limit_requests=3)
    streaming = threading.Event()

    def slow_turn() -> int:
        with app.client.stream("POST", "/chat/stream", json={"message": "@@deltas=10 @@delay=0.2"}) as r:
            for _ in r.iter_raw():
                streaming.set()
            return r.status_code

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(slow_turn)
        assert streaming.wait(5)
        started = time.monotonic()
        full = app.chat(None, "hi")
        waited = time.monotonic() - started
        # A proper 503 after the bounded wait, not a 200 carrying an error.
        assert_error(full, 503, "unavailable")
        assert full.headers["retry-after"] == "1"
        assert 0.95 <= waited < 1.8
        # A request that fits in the wait gets the slot as soon as it frees.
        queued = pool.submit(app.chat, None, "queued")
        assert running.result(10) == 200
        assert queued.result(10).status_code == 200
    refused = [r for r in app.wait_reports(3) if r.status == 503]
    assert [r.outcome for r in refused] == [Outcome.REJECTED]
    # The request refused for want of a slot took nothing from the caller's limit: the third request of
    # three is still admitted (a 429 would carry remaining 0 too), and it leaves none.
    last = app.chat(None, "last")
    assert last.status_code == 200, last.text
    assert limit_headers(last)[1] == 0


def test_an_oversized_chunked_body_gets_413_before_it_is_sent_whole(live_app: StartApp) -> None:
    app = live_app(max_body_bytes=4096)
    host, port = app.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /chat/stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 1024
        for _ in range(6):  # 6 KiB sent of a body that would go on for a megabyte
            sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        reply = sock.recv(65536)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert orjson.loads(body)["error"]["type"] == "request_too_large"


def test_admission_refuses_with_503_when_redis_is_unreachable(live_app: StartApp) -> None:
    app = live_app(redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.5, rate_limit_requests=100)
    for session in ("s", None):
        response = app.chat(session, "hi")
        body = assert_error(response, 503, "unavailable")
        assert response.headers["retry-after"] == "1"
        assert "limits" in body["error"]["message"]
    # Nothing to check, nothing to refuse: without limits a one-shot turn needs no Redis at all.
    open_app = live_app(redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.5)
    assert open_app.chat(None, "hi").status_code == 200
    assert open_app.chat("s", "hi").status_code == 503


def test_limits_survive_a_redis_that_forgot_its_scripts(
    live_app: StartApp, rdb: sync_redis.Redis, standin: StandInModel
) -> None:
    """Settling rides in the commit's pipeline; a Redis restart (NOSCRIPT) must not lose either."""
    app = live_app(rate_limit_concurrent=1, rate_limit_tokens=10**6, rate_limit_requests=100)
    assert app.chat("n", "one").status_code == 200
    with app.client.stream("POST", "/chat/n/stream", json={"message": "@@deltas=6 @@delay=0.05"}) as r:
        chunks = r.iter_raw()
        next(chunks)
        rdb.script_flush()
        for _ in chunks:
            pass
    assert [m["content"] for m in app.history("n")][-1] == "w0 w1 w2 w3 w4 w5 "
    # The lease was given back: one stream at a time, and the next is admitted at once.
    assert app.chat("n", "three").status_code == 200


@pytest.mark.anyio
async def test_a_turn_whose_lease_lapsed_is_still_charged_once(
    admission_for: Callable[..., Admission], rdb: sync_redis.Redis
) -> None:
    """A worker cut off from Redis for a whole lease ttl still pays for the tokens its turn used."""
    admission = admission_for(rate_limit_tokens=100, lock_ttl_seconds=0.2)
    decision = await admission.admit("k")
    assert decision.ticket is not None
    await asyncio.sleep(0.3)  # the lease is gone
    assert not rdb.exists(decision.ticket.keys[1])
    used = TurnUsage("m", 100, 50)
    assert await admission.settle_call(decision.ticket, used).run() == 1
    assert await admission.settle_call(decision.ticket, used).run() == 0  # a re-send charges nothing
    refused = await admission.admit("k")
    assert not refused.allowed and refused.message.startswith("over the limit of 100 tokens")


@pytest.mark.anyio
async def test_a_renewal_that_arrives_after_the_settlement_does_not_revive_the_lease(
    admission_for: Callable[..., Admission], rdb: sync_redis.Redis
) -> None:
    """The renewer builds its calls, then waits for a connection; the turn's settlement may reach Redis
    first. The late renewal must not take the stream back for a lease ttl."""
    admission = admission_for(rate_limit_concurrent=1, lock_ttl_seconds=30)
    decision = await admission.admit("k")
    assert decision.ticket is not None
    leases = decision.ticket.keys[1]
    renewal = admission.renew_call(decision.ticket)  # built, not yet sent
    assert await admission.settle_call(decision.ticket, None).run() == 1
    assert await renewal.run() == 0  # ...and now it arrives
    assert rdb.zcard(leases) == 0
    assert (await admission.admit("k")).allowed  # the caller's one stream is free at once


@pytest.mark.anyio
async def test_a_renewal_takes_back_a_lease_that_lapsed_while_its_stream_runs(
    admission_for: Callable[..., Admission], rdb: sync_redis.Redis
) -> None:
    """A worker that stalled for a whole ttl still runs its stream: the lease counts again."""
    admission = admission_for(rate_limit_concurrent=1, lock_ttl_seconds=0.2)
    decision = await admission.admit("k")
    assert decision.ticket is not None
    leases = decision.ticket.keys[1]
    await asyncio.sleep(0.3)  # the lease is gone
    assert not rdb.exists(leases)
    assert await admission.renew_call(decision.ticket).run() == 1
    assert rdb.zcard(leases) == 1
    assert not (await admission.admit("k")).allowed


@pytest.mark.anyio
async def test_admission_costs_one_round_trip(redis_url: str, make_settings: Callable[..., Settings]) -> None:
    """Every limit is checked and taken by one script: one command, one round trip, on the wire."""
    from tests.bench.redis_meter import RedisMeter

    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    with RedisMeter(host, int(port)) as meter:
        client = make_redis(make_settings(redis_url=meter.url))
        admission = Admission(
            client,
            Scripts.register(client),
            make_settings(rate_limit_requests=100, rate_limit_tokens=1000, rate_limit_concurrent=10),
        )
        try:
            await admission.admit("warm")  # connects, and loads the script once
            meter.reset()
            decision = await admission.admit("k")
            counts = meter.snapshot()
        finally:
            await client.aclose(close_connection_pool=True)
    assert decision.allowed
    assert counts["round_trips"] == 1
    assert counts["by_name"] == {"EVALSHA": 1}


@pytest.mark.parametrize(
    ("limits", "round_trips", "scripts"),
    [
        # admit with begin_turn (the lock and the history) in one script; commit_turn with settle in one
        pytest.param(True, 2, 2, id="with-limits"),
        # begin_turn; commit_turn with settle (which counts the turn's usage even with no limit) in one
        pytest.param(False, 2, 2, id="no-limits"),
    ],
)
def test_what_a_committed_turn_costs_redis(
    redis_url: str, live_app: StartApp, limits: bool, round_trips: int, scripts: int
) -> None:
    """Counted on the wire: admission and the lock together, then the commit and the settlement
    together, each pair one script."""
    from tests.bench.redis_meter import RedisMeter

    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    configured = {"rate_limit_requests": 100, "rate_limit_tokens": 10**6, "rate_limit_concurrent": 5}
    with RedisMeter(host, int(port)) as meter:
        app = live_app(redis_url=meter.url, **(configured if limits else {}))
        assert app.chat("warm", "hi").status_code == 200  # connections made, scripts loaded
        app.wait_reports(1)
        meter.reset()
        assert app.chat("counted", "hi").text == "echo: hi [turns=1]"
        app.wait_reports(2)
        counts = meter.snapshot()
    assert counts["round_trips"] == round_trips
    assert counts["by_name"] == {"EVALSHA": scripts}


def test_a_request_its_limits_refuse_never_touches_its_session(redis_url: str, live_app: StartApp) -> None:
    """Admission goes alone, first: a refused request sends Redis nothing but that one script."""
    from tests.bench.redis_meter import RedisMeter

    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    with RedisMeter(host, int(port)) as meter:
        app = live_app(redis_url=meter.url, rate_limit_requests=1)
        assert app.chat("s", "hi").status_code == 200
        app.wait_reports(1)
        meter.reset()
        assert_error(app.chat("s", "again"), 429, "rate_limited")
        app.wait_reports(2)
        counts = meter.snapshot()
    assert counts["round_trips"] == 1
    assert counts["by_name"] == {"EVALSHA": 1}


def test_a_request_over_its_limit_on_a_busy_session_gets_429_and_leaves_the_turn_alone(
    live_app: StartApp, rdb: sync_redis.Redis, prefix: str
) -> None:
    """The limits decide first: over them, a request gets 429 whether or not its session is busy, and
    the lock of the turn in flight is never touched."""
    app = live_app(rate_limit_requests=2)
    lock = session_keys(prefix, "public", "busy").lock
    with app.client.stream(
        "POST", "/chat/busy/stream", json={"message": "@@deltas=10 @@delay=0.1"}
    ) as streaming:
        assert streaming.status_code == 200
        holder = rdb.get(lock)
        assert app.chat("busy", "second").status_code == 409  # within the limit: the session is busy
        assert_error(app.chat("busy", "third"), 429, "rate_limited")  # over it: 429, busy or not
        assert rdb.get(lock) == holder
        streaming.read()
    assert rdb.get(lock) is None
    reply = "".join(f"w{i} " for i in range(10))
    assert [m["content"] for m in app.history("busy")] == ["@@deltas=10 @@delay=0.1", reply]


def test_a_request_refused_by_its_limit_leaves_the_session_as_it_was(
    live_app: StartApp, rdb: sync_redis.Redis, prefix: str
) -> None:
    app = live_app(rate_limit_requests=1)
    assert app.chat("s", "first").status_code == 200
    before = {k: rdb.dump(k) for k in rdb.scan_iter(f"{prefix}:{{public.s}}:*")}
    assert_error(app.chat("s", "second"), 429, "rate_limited")
    assert {k: rdb.dump(k) for k in rdb.scan_iter(f"{prefix}:{{public.s}}:*")} == before
    assert rdb.get(session_keys(prefix, "public", "s").lock) is None
