"""Prompt caching of the conversation, and each caller's usage per day and model (GET /usage)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis

from api.config import Settings
from api.dev.standin import ReportedUsage, StandInModel, StandInThread
from api.store.admission import Admission
from api.store.redis import make_redis
from api.store.scripts import ScriptCall, Scripts
from api.store.usage import EPOCH, TurnUsage, day_key, settle_args, settle_keys
from tests.conftest import LiveApp
from tests.processes import worker_env, workers
from tests.test_requests import assert_error

StartApp = Callable[..., LiveApp]
MARK = {"type": "ephemeral"}
SYSTEM = "You are a careful assistant. " * 8  # about 60 tokens: over the stand-in's minimum here
OPEN_SUBJECT = "a.127.0.0.1"  # an open API counts usage per client address, as its limits


@pytest.fixture(scope="module")
def cached() -> Iterator[StandInModel]:
    """A stand-in whose prompt cache keeps prefixes from 50 tokens, so short turns are cached."""
    with StandInThread(cache_min_tokens=50) as model:
        yield model


@pytest.fixture
def app_on(live_app: StartApp, cached: StandInModel) -> StartApp:
    def start(**settings: Any) -> LiveApp:
        return live_app(anthropic_base_url=cached.url, **settings)

    return start


def long(n: int, tag: str = "") -> str:
    """A message long enough to be cached; `tag` keeps a test's prompts apart from another's."""
    return f"{tag} turn {n}: " + "tell me more about the weather " * 8


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def usage(app: LiveApp, **query: str) -> httpx.Response:
    return app.client.get("/usage", params=query)


def added(reported: list[ReportedUsage]) -> dict[str, int]:
    return {
        "turns": len(reported),
        "input_tokens": sum(u.input_tokens for u in reported),
        "output_tokens": sum(u.output_tokens for u in reported),
        "cache_read_input_tokens": sum(u.cache_read_input_tokens for u in reported),
        "cache_creation_input_tokens": sum(u.cache_creation_input_tokens for u in reported),
    }


# Prompt caching.


def test_the_newest_message_and_the_system_prompt_are_marked_and_the_history_goes_back_as_stored(
    app_on: StartApp, cached: StandInModel
) -> None:
    app = app_on(system_prompt=SYSTEM)
    for n in range(3):
        assert app.chat("marks", long(n, "marks")).status_code == 200
    sent = cached.requests[-1].body
    assert sent is not None
    assert sent["system"] == [{"type": "text", "text": SYSTEM, "cache_control": MARK}]
    *older, newest = sent["messages"]
    assert newest == {
        "role": "user",
        "content": [{"type": "text", "text": long(2, "marks"), "cache_control": MARK}],
    }
    # Everything before the breakpoint is the stored history, byte for byte, and unmarked.
    stored = [{"role": m["role"], "content": m["content"]} for m in app.history("marks")[:4]]
    assert older == stored
    assert "cache_control" not in sent


def test_the_second_turn_reads_the_first_from_the_cache(
    app_on: StartApp, cached: StandInModel, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_on()
    with caplog.at_level(logging.INFO, logger="api.turns"):
        for n in range(3):
            assert app.chat("reads", long(n, "reads")).status_code == 200
        first, second, third = app.wait_reports(3)[-3:]
    # The turn's log line carries both counts, as the report does.
    logged = [r.turn for r in caplog.records if hasattr(r, "turn")][-3:]  # type: ignore[attr-defined]
    assert [line["cache_read_input_tokens"] for line in logged] == [
        r.cache_read_input_tokens for r in (first, second, third)
    ]
    assert [line["cache_creation_input_tokens"] for line in logged] == [
        r.cache_creation_input_tokens for r in (first, second, third)
    ]
    reported = cached.usage[-3:]
    # The first turn writes its prompt; each later one reads the turn before's and writes what is new.
    assert first.cache_read_input_tokens == 0 and first.cache_creation_input_tokens > 50
    assert second.cache_read_input_tokens == first.cache_creation_input_tokens
    assert (
        third.cache_read_input_tokens == second.cache_read_input_tokens + second.cache_creation_input_tokens
    )
    for report, sent in zip((first, second, third), reported, strict=True):
        assert report.input_tokens == sent.input_tokens  # the uncached part only, as Claude reports it
        assert report.cache_read_input_tokens == sent.cache_read_input_tokens
        assert report.cache_creation_input_tokens == sent.cache_creation_input_tokens
    metrics = app.client.get("/metrics").text
    read = sum(r.cache_read_input_tokens for r in app.reports)
    written = sum(r.cache_creation_input_tokens for r in app.reports)
    assert f'chat_tokens_total{{direction="cache_read"}} {float(read)}' in metrics
    assert f'chat_tokens_total{{direction="cache_write"}} {float(written)}' in metrics


def test_with_caching_off_nothing_is_marked_or_cached(app_on: StartApp, cached: StandInModel) -> None:
    app = app_on(prompt_cache="off", system_prompt=SYSTEM)
    for n in range(2):
        assert app.chat("off", long(n, "off")).status_code == 200
    sent = cached.requests[-1].body
    assert sent is not None
    assert sent["system"] == SYSTEM
    assert all(isinstance(m["content"], str) for m in sent["messages"])
    assert all(r.cache_read_input_tokens == r.cache_creation_input_tokens == 0 for r in app.wait_reports(2))


# GET /usage.


def test_usage_adds_up_what_claude_reported_per_day_and_model(app_on: StartApp, cached: StandInModel) -> None:
    app = app_on(allowed_models=["claude-sonnet-4-6", "claude-haiku-4-5"])
    before = len(cached.usage)
    for n in range(3):
        assert app.chat("u", long(n, "sum")).status_code == 200
    assert app.chat("v", "short", model="claude-haiku-4-5").status_code == 200
    app.wait_reports(4)
    response = usage(app)
    assert response.status_code == 200
    body = response.json()
    assert body["key"] is None  # an open API has no key to name
    assert body["to"] == today()
    assert body["from"] == (datetime.now(UTC).date() - timedelta(days=29)).isoformat()
    sonnet, haiku = cached.usage[before : before + 3], cached.usage[before + 3 :]
    assert body["usage"] == [
        {"day": today(), "model": "claude-haiku-4-5", **added(haiku)},
        {"day": today(), "model": "claude-sonnet-4-6", **added(sonnet)},
    ]
    assert body["total"] == added(cached.usage[before:])
    assert usage(app, **{"from": "2000-01-01", "to": "2000-01-31"}).json()["usage"] == []


def test_cut_and_failed_turns_are_counted_as_they_are_charged(app_on: StartApp) -> None:
    app = app_on(upstream_max_retries=0)
    cut = {"message": "@@deltas=8 @@error_after=3"}
    with (
        app.client.stream("POST", "/chat/cut/stream", json=cut) as r,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        r.read()
    assert app.chat("failed", "@@error_after=0").status_code == 503  # overloaded before any text
    assert app.chat("refused", "@@status=400").status_code == 502  # Claude refused: nothing was used
    reports = app.wait_reports(3)
    body = usage(app).json()
    assert body["total"]["turns"] == 2
    assert body["total"]["input_tokens"] == sum(r.input_tokens for r in reports) > 0
    # A cut reply's output is charged for the text that reached the client, at least.
    assert body["total"]["output_tokens"] >= len("w0 w1 w2 ") // 4


@pytest.mark.parametrize(
    "query",
    [
        {"from": "2025-13-01"},
        {"from": "20250101"},
        {"to": "2025-02-30"},
        {"to": "yesterday"},
        {"from": "2025-01-01 "},
        {"from": "2025-03-02", "to": "2025-03-01"},
        {"from": "2024-01-01", "to": "2025-01-01"},  # over the 90 days kept
        {"from": "\x00"},
    ],
)
def test_a_bad_range_is_a_400(app_on: StartApp, query: dict[str, str]) -> None:
    assert_error(usage(app_on(), **query), 400, "invalid_request")


def test_usage_needs_a_key_and_shows_only_the_callers_own(app_on: StartApp) -> None:
    first, second = "usage-key-one-0123456789", "usage-key-two-0123456789"
    app = app_on(api_keys=[first, second])
    assert_error(usage(app), 401, "authentication_error")
    sent = app.client.post(
        "/chat/k/stream", json={"message": "hello"}, headers={"authorization": f"Bearer {first}"}
    )
    assert sent.status_code == 200
    app.wait_reports(1)
    mine = app.client.get("/usage", headers={"x-api-key": first}).json()
    theirs = app.client.get("/usage", headers={"x-api-key": second}).json()
    assert mine["total"]["turns"] == 1 and theirs["total"]["turns"] == 0
    # Each key by its name (CHAT_API_KEYS entries are named by their place), never by the key.
    assert (mine["key"], theirs["key"]) == ("env-1", "env-2")


# In Redis: exact, kept for the retention, on Redis's day.


@pytest.fixture
async def admission(redis_url: str, make_settings: Callable[..., Settings]) -> AsyncIterator[Admission]:
    client = make_redis(make_settings())
    yield Admission(client, Scripts.register(client), make_settings(rate_limit_tokens=100))
    await client.aclose(close_connection_pool=True)


@pytest.mark.anyio
async def test_a_resent_settlement_counts_its_turn_once(
    admission: Admission, rdb: sync_redis.Redis, prefix: str
) -> None:
    decision = await admission.admit("k")
    assert decision.ticket is not None
    used = TurnUsage("m", 10, 20, 30, 40)
    call = admission.settle_call(decision.ticket, used)
    assert await call.run() == 1
    assert await call.run() == 0  # redis-py, or the commit, sent it again
    day = datetime.now(UTC).date()
    assert rdb.hgetall(day_key(prefix, "k", day)) == {
        "turns:m": "1",
        "input_tokens:m": "10",
        "output_tokens:m": "20",
        "cache_read_input_tokens:m": "30",
        "cache_creation_input_tokens:m": "40",
    }


@pytest.mark.anyio
async def test_a_day_is_kept_for_the_retention_after_it_ends(
    admission: Admission, rdb: sync_redis.Redis, prefix: str
) -> None:
    decision = await admission.admit("k")
    assert decision.ticket is not None
    await admission.settle_call(decision.ticket, TurnUsage("m", 1, 1)).run()
    seconds, micros = rdb.time()
    day = (seconds * 1000 + micros // 1000) // 86_400_000
    key = day_key(prefix, "k", EPOCH + timedelta(days=day))
    assert rdb.pexpiretime(key) == (day + 1 + 90) * 86_400_000


@pytest.mark.anyio
async def test_a_turn_is_counted_on_redis_s_day_whatever_the_worker_s_clock_says(
    admission: Admission, rdb: sync_redis.Redis, prefix: str
) -> None:
    decision = await admission.admit("k")
    assert decision.ticket is not None
    redis_day = EPOCH + timedelta(days=int(rdb.time()[0]) // 86_400)
    for worker_day in (redis_day - timedelta(days=1), redis_day + timedelta(days=1)):
        lease = decision.ticket.lease + worker_day.isoformat()
        keys = [*decision.ticket.keys, *settle_keys(decision.ticket.keys[0], worker_day)]
        args = [lease, 2, 100, 60_000, *settle_args(TurnUsage("m", 1, 1), worker_day, 90)]
        assert await ScriptCall(admission.scripts.settle, keys, args).run() == 1
    assert rdb.hget(day_key(prefix, "k", redis_day), "turns:m") == "2"


@pytest.mark.anyio
async def test_the_token_limit_charges_cache_writes_but_not_cache_reads(admission: Admission) -> None:
    """As Anthropic's input-tokens-per-minute limits count a prompt on most models."""
    reads = await admission.admit("reader")
    assert reads.ticket is not None
    await admission.settle_call(reads.ticket, TurnUsage("m", 10, 10, cache_read_input_tokens=10**6)).run()
    assert (await admission.admit("reader")).allowed  # 20 of 100 charged
    writes = await admission.admit("writer")
    assert writes.ticket is not None
    await admission.settle_call(writes.ticket, TurnUsage("m", 10, 10, cache_creation_input_tokens=150)).run()
    refused = await admission.admit("writer")
    assert not refused.allowed and refused.message.startswith("over the limit of 100 tokens")


@pytest.mark.slow
def test_usage_is_exact_over_fifty_turns_on_two_workers(
    redis_url: str, prefix: str, cached: StandInModel, tmp_path: Path
) -> None:
    env = worker_env(redis_url, cached.url, prefix)
    before = len(cached.usage)
    with workers(2, env, tmp_path) as started:

        def conversation(session: int) -> None:
            with httpx.Client(timeout=20) as client:
                for n in range(10):  # each turn on the other worker
                    url = f"{started[(session + n) % 2].url}/chat/w{session}/stream"
                    response = client.post(url, json={"message": long(n)})
                    assert response.status_code == 200, response.text

        with ThreadPoolExecutor(5) as pool:
            list(pool.map(conversation, range(5)))
        # Each reply's commit, and its settlement with it, comes before its final chunk.
        reported = added(cached.usage[before:])
        assert reported["turns"] == 50 and reported["cache_read_input_tokens"] > 0
        for worker in started:
            body = httpx.get(f"{worker.url}/usage", timeout=5).json()
            assert body["total"] == reported
            assert [row["model"] for row in body["usage"]] == ["claude-sonnet-4-6"]


def test_the_caching_figure_in_the_docs_comes_from_the_bench_script(redis_url: str, prefix: str) -> None:
    from tests.bench.caching import billed, conversation

    off, auto = (conversation(redis_url, mode, 3, prefix) for mode in ("off", "auto"))
    assert off["turns"] == auto["turns"] == 3
    assert auto["cache_read_input_tokens"] > 0 and billed(auto) < billed(off)
