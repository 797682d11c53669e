"""Turn semantics (SPEC §4) end to end: real sockets, real Redis, the real SDK against the stand-in model."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest
import redis as sync_redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.dev.standin import StandInModel
from api.http.protocol import ChatHttpProtocol
from api.outcomes import Outcome
from api.store.keys import session_keys
from api.store.scripts import Bundle, ScriptCall, script_source
from tests.conftest import LiveApp
from tests.processes import wait_until

StartApp = Callable[..., LiveApp]


# Under the production protocol the server reports a disconnect itself and the reply is pushed to the
# client from the upstream's callbacks; under plain httptools the turn learns of a disconnect from
# `receive()` and pulls the reply through `send()`. Both must behave the same.
SERVERS = [pytest.param(ChatHttpProtocol, id="chat-protocol"), pytest.param("httptools", id="httptools")]


def redis_state(rdb: sync_redis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under the test's prefix with its value: what "Redis exactly as it was" compares.

    Not the caller's usage (and the settlements that keep it exact): a turn that reached Claude was
    billed for, however it ended, and is counted (tests/test_usage.py)."""
    state: dict[str, Any] = {}
    for key in rdb.scan_iter(f"{prefix}:*"):
        if ":usage:" in key or key.endswith(":settled"):
            continue
        kind = rdb.type(key)
        if kind == "list":
            state[key] = rdb.lrange(key, 0, -1)
        elif kind == "hash":
            state[key] = rdb.hgetall(key)
        else:
            state[key] = rdb.get(key)
    return state


def read_cut_reply(app: LiveApp, session: str, message: str) -> tuple[str, Exception | None]:
    """Send a turn expected to break mid-stream; return what arrived and how the body ended."""
    received: list[str] = []
    with app.client.stream("POST", f"/chat/{session}/stream", json={"message": message}) as response:
        assert response.status_code == 200
        try:
            for text in response.iter_text():
                received.append(text)
        except httpx.HTTPError as exc:
            return "".join(received), exc
    return "".join(received), None


def test_a_conversation_remembers_its_history(live_app: StartApp, standin: StandInModel) -> None:
    app = live_app()
    assert app.chat("conv", "one").text == "echo: one [turns=1]"
    assert app.chat("conv", "two").text == "echo: two [turns=2]"
    sent = standin.requests[-1].body
    assert sent is not None
    assert sent["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "echo: one [turns=1]"},
        # The newest message marks the conversation for the prompt cache (CHAT_PROMPT_CACHE=auto).
        {
            "role": "user",
            "content": [{"type": "text", "text": "two", "cache_control": {"type": "ephemeral"}}],
        },
    ]
    history = app.history("conv")
    assert [m["content"] for m in history] == ["one", "echo: one [turns=1]", "two", "echo: two [turns=2]"]
    assert history[0]["created_at"] <= history[1]["created_at"] <= history[2]["created_at"]


def test_the_reply_streams_as_it_is_generated(live_app: StartApp) -> None:
    app = live_app()
    arrivals: list[float] = []
    started = time.monotonic()
    with app.client.stream("POST", "/chat/stream", json={"message": "@@deltas=5 @@delay=0.3"}) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        for _ in response.iter_raw():
            arrivals.append(time.monotonic() - started)
    # Five deltas 0.3 s apart: the first must arrive long before the last was generated.
    assert len(arrivals) >= 4
    assert arrivals[-1] - arrivals[0] > 0.8


def test_one_shot_turns_store_nothing(live_app: StartApp, rdb: sync_redis.Redis, prefix: str) -> None:
    app = live_app()
    assert app.chat(None, "alone").text == "echo: alone [turns=1]"
    assert redis_state(rdb, prefix) == {}


@pytest.mark.parametrize(
    ("message", "settings", "status", "type_"),
    [
        ("x @@status=400", {}, 502, "upstream_error"),
        ("x @@status=401", {}, 502, "upstream_error"),
        ("x @@status=500", {"upstream_max_retries": 0}, 502, "upstream_error"),
        ("x @@status=529", {"upstream_max_retries": 1}, 503, "unavailable"),
        ("x @@status=429 @@retry_after=1", {"upstream_max_retries": 0}, 503, "unavailable"),
        (
            "x @@hang_before",
            {"upstream_timeout_seconds": 0.5, "upstream_max_retries": 0},
            504,
            "upstream_timeout",
        ),
        ("x @@error_after=0", {}, 503, "unavailable"),
        ("x @@drop_after=0", {}, 502, "upstream_error"),
    ],
)
def test_failures_before_the_first_byte_are_http_errors_and_change_nothing(
    live_app: StartApp,
    rdb: sync_redis.Redis,
    prefix: str,
    message: str,
    settings: dict[str, Any],
    status: int,
    type_: str,
) -> None:
    app = live_app(**settings)
    app.chat("s", "before")
    before = redis_state(rdb, prefix)
    response = app.chat("s", message)
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == type_
    if status == 503:
        assert int(response.headers["retry-after"]) >= 1
    assert redis_state(rdb, prefix) == before  # history untouched, lock released
    assert app.chat("s", "after").status_code == 200
    reports = app.wait_reports(3)
    assert reports[1].outcome is Outcome.UPSTREAM_ERROR


def test_retryable_upstream_errors_are_retried_before_the_stream(
    live_app: StartApp, standin: StandInModel
) -> None:
    app = live_app(upstream_max_retries=2)
    seen = len(standin.requests)
    response = app.chat("s", "x @@status=529 @@fail_attempts=2")
    assert response.status_code == 200
    assert response.text == "echo: x [turns=1]"
    attempts = [r.headers.get("x-stainless-retry-count") for r in standin.requests[seen:]]
    assert attempts == ["0", "1", "2"]


def test_retry_after_is_honoured(live_app: StartApp) -> None:
    app = live_app(upstream_max_retries=1)
    started = time.monotonic()
    response = app.chat("s", "x @@status=429 @@fail_attempts=1 @@retry_after=1")
    assert response.status_code == 200
    assert time.monotonic() - started >= 1.0


def test_retries_give_up_after_the_configured_count(live_app: StartApp, standin: StandInModel) -> None:
    app = live_app(upstream_max_retries=1)
    seen = len(standin.requests)
    assert app.chat("s", "x @@status=529").status_code == 503
    assert len(standin.requests) - seen == 2


@pytest.mark.parametrize("http", SERVERS)
@pytest.mark.parametrize(
    "fault", ["error_after=2", "drop_after=2", "close_after=2", "eof_after=2", "hang_after=2"]
)
def test_a_reply_broken_mid_stream_is_cut_short_and_commits_nothing(
    live_app: StartApp, rdb: sync_redis.Redis, prefix: str, fault: str, http: Any
) -> None:
    app = live_app(http, upstream_timeout_seconds=1.0)
    app.chat("s", "before")
    before = redis_state(rdb, prefix)
    received, ending = read_cut_reply(app, "s", f"cut @@{fault}")
    # The client sees an incomplete chunked body, never a clean end, and no error text in the reply.
    assert isinstance(ending, httpx.RemoteProtocolError), ending
    assert received == "echo: cut "
    assert redis_state(rdb, prefix) == before
    assert app.chat("s", "next").text == "echo: next [turns=2]"
    reports = app.wait_reports(3)
    assert reports[1].outcome is Outcome.UPSTREAM_ERROR
    assert not reports[1].committed


def test_a_reply_is_committed_before_its_final_chunk(live_app: StartApp) -> None:
    """A client that has read the end of a reply can send the next turn at once and never gets 409."""
    app = live_app()
    for n in range(1, 21):
        response = app.chat("rapid", f"turn {n}")
        assert response.status_code == 200, response.text
        assert response.text == f"echo: turn {n} [turns={n}]"
    assert len(app.history("rapid")) == 40


def test_concurrent_turns_on_one_session_get_409(live_app: StartApp) -> None:
    app = live_app()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(app.chat, "busy", f"m{n} @@delay=0.1 @@deltas=5") for n in range(8)]
        responses = [f.result() for f in futures]
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * 7
    busy = next(r for r in responses if r.status_code == 409)
    assert busy.json()["error"]["type"] == "session_busy"
    assert len(app.history("busy")) == 2


@pytest.mark.parametrize("http", SERVERS)
def test_client_disconnect_closes_the_upstream_and_commits_nothing(
    live_app: StartApp, standin: StandInModel, rdb: sync_redis.Redis, prefix: str, http: Any
) -> None:
    app = live_app(http)
    app.chat("s", "before")
    before = redis_state(rdb, prefix)
    cancelled = standin.streams_cancelled
    with app.client.stream(
        "POST", "/chat/s/stream", json={"message": "@@deltas=200 @@delay=0.05"}
    ) as response:
        assert response.status_code == 200
        next(response.iter_raw())
    # The client went away after the first chunk of a ten-second reply.
    wait_until(lambda: standin.streams_cancelled > cancelled, 2.0, "the upstream stream to be closed")
    reports = app.wait_reports(2)
    assert reports[1].outcome is Outcome.CLIENT_DISCONNECTED_WHILE_STREAMING
    assert redis_state(rdb, prefix) == before
    assert app.chat("s", "next").status_code == 200  # no stale lock


@pytest.mark.parametrize("http", SERVERS)
def test_client_disconnect_before_streaming(
    live_app: StartApp, standin: StandInModel, rdb: sync_redis.Redis, prefix: str, http: Any
) -> None:
    app = live_app(http, upstream_timeout_seconds=10)
    cancelled = standin.streams_cancelled
    with app.send_chat("/chat/s/stream", "slow @@first_delay=5"):
        wait_until(
            lambda: standin.streams_started > 0 and standin.active_streams > 0, 2.0, "the upstream call"
        )
    wait_until(lambda: standin.streams_cancelled > cancelled, 2.0, "the upstream stream to be closed")
    reports = app.wait_reports(1)
    assert reports[0].outcome is Outcome.CLIENT_DISCONNECTED_BEFORE_STREAMING
    assert redis_state(rdb, prefix) == {}
    assert app.chat("s", "now").status_code == 200


def read_chunked_reply(sock: socket.socket) -> bytes:
    """Read a whole chunked 200 response off `sock` and return its body, de-chunked."""
    data = bytearray()
    while not data.endswith(b"\r\n0\r\n\r\n"):
        part = sock.recv(1 << 20)
        assert part, "the connection closed before the final chunk"
        data += part
    start = data.index(b"\r\n\r\n") + 4
    assert data.startswith(b"HTTP/1.1 200")
    body = bytearray()
    while True:
        end = data.index(b"\r\n", start)
        size = int(data[start:end], 16)
        if size == 0:
            return bytes(body)
        body += data[end + 2 : end + 2 + size]
        start = end + 4 + size


@pytest.mark.parametrize("http", SERVERS)
def test_a_slow_client_holds_the_upstream_back_and_still_gets_the_whole_reply(
    live_app: StartApp, standin: StandInModel, http: Any
) -> None:
    """A client that stops reading is not buffered for: the worker stops reading Claude's reply
    until the client catches up, so the upstream's stream stays open, unfinished. That wait is not
    an upstream that stalled, however long it is; once the client reads, all of the reply arrives."""
    app = live_app(http, upstream_timeout_seconds=1.0)
    completed = standin.streams_completed
    # 20 MB of text: more than the kernel's socket buffers on both sides hold (Linux grows a
    # loopback socket's to 4 MB and more), so only a relay that reads no further can hold it back.
    deltas, size = 20_000, 1000
    sock = app.send_chat("/chat/stream", f"@@deltas={deltas} @@delta_chars={size}", 16384)
    with sock:
        time.sleep(2.5)  # not reading, for over two read timeouts
        assert standin.active_streams == 1 and standin.streams_completed == completed
        assert app.reports == []
        body = read_chunked_reply(sock)
    assert len(body) == deltas * size
    assert body.decode() == "".join(f"w{i}".ljust(size - 1, "x") + " " for i in range(deltas))
    reports = app.wait_reports(1)
    assert reports[0].outcome is Outcome.SUCCESS
    assert standin.streams_completed == completed + 1


def test_regenerate_asks_again_and_replaces_the_reply(live_app: StartApp, standin: StandInModel) -> None:
    app = live_app(prompt_cache="off")  # messages as plain strings, with no cache marker
    app.chat("r", "first")
    app.chat("r", "second")
    before = app.history("r")
    response = app.chat("r", None, regenerate=True)
    assert response.status_code == 200
    assert response.text == "echo: second [turns=2]"
    sent = standin.requests[-1].body
    assert sent is not None
    assert sent["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "echo: first [turns=1]"},
        {"role": "user", "content": "second"},
    ]
    after = app.history("r")
    assert len(after) == 4
    assert after[:3] == before[:3]
    assert after[3]["id"] != before[3]["id"]


def test_a_failed_regenerate_keeps_the_old_reply(
    live_app: StartApp, rdb: sync_redis.Redis, prefix: str
) -> None:
    app = live_app()
    app.chat("r", "hello")
    # Make the stored user message one that breaks the stream when asked again.
    keys = session_keys(prefix, "public", "r")
    user = orjson.loads(rdb.lindex(keys.history, 0))
    user["content"] = "hello @@error_after=1"
    rdb.lset(keys.history, 0, orjson.dumps(user))
    before = redis_state(rdb, prefix)
    with app.client.stream("POST", "/chat/r/stream", json={"regenerate": True}) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()
    assert redis_state(rdb, prefix) == before


def test_context_is_trimmed_to_the_budget_and_starts_with_the_user(
    live_app: StartApp, standin: StandInModel
) -> None:
    app = live_app(context_max_tokens=40, prompt_cache="off")
    for n in range(6):
        app.chat("ctx", f"message number {n} " + "word " * 10)
    sent = standin.requests[-1].body
    assert sent is not None
    messages = sent["messages"]
    assert messages[0]["role"] == "user"
    assert messages[-1]["content"].startswith("message number 5")
    assert len(messages) < 11  # older turns were left out
    assert len(app.history("ctx")) == 12  # but all are stored


def test_stored_history_is_capped(live_app: StartApp) -> None:
    # Without the prompt cache, whose context would open on a checkpoint (tests/test_context.py).
    app = live_app(history_max_messages=4, prompt_cache="off")
    for n in range(4):
        app.chat("cap", f"m{n}")
    assert [m["content"] for m in app.history("cap")] == [
        "m2",
        "echo: m2 [turns=3]",
        "m3",
        "echo: m3 [turns=3]",
    ]


def test_a_session_expires_after_its_ttl(live_app: StartApp) -> None:
    app = live_app(session_ttl_seconds=1)
    app.chat("ttl", "hello")
    assert app.history("ttl")
    time.sleep(1.3)
    assert app.client.get("/chat/ttl/messages").status_code == 404


def test_deleting_a_session_mid_turn_commits_nothing(live_app: StartApp) -> None:
    app = live_app()
    app.chat("d", "first")
    outcome: dict[str, Any] = {}

    def slow_turn() -> None:
        outcome["result"] = read_cut_reply(app, "d", "@@deltas=10 @@delay=0.1")

    thread = threading.Thread(target=slow_turn)
    thread.start()
    time.sleep(0.3)
    assert app.client.delete("/chat/d").status_code == 204
    thread.join(10)
    _, ending = outcome["result"]
    assert isinstance(ending, httpx.RemoteProtocolError)  # the whole reply arrived but was not stored
    assert app.client.get("/chat/d/messages").status_code == 404


def test_every_request_has_exactly_one_outcome_logged_counted_and_hooked(
    live_app: StartApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = live_app(upstream_max_retries=0)
    caplog.set_level(logging.INFO, logger="api.turns")
    app.chat("o", "fine")
    app.chat("o", "")
    app.chat("o", "x @@status=500")
    read_cut_reply(app, "o", "x @@error_after=1")
    reports = app.wait_reports(4)
    time.sleep(0.2)
    assert [r.outcome for r in reports] == [
        Outcome.SUCCESS,
        Outcome.REJECTED,
        Outcome.UPSTREAM_ERROR,
        Outcome.UPSTREAM_ERROR,
    ]
    ok = reports[0]
    assert ok.session_id == "o" and ok.input_tokens > 0 and ok.output_tokens > 0
    assert ok.upstream_request_id and ok.upstream_request_id.startswith("req_")
    assert ok.duration_seconds > 0 and ok.first_token_seconds is not None
    lines = [r for r in caplog.records if r.name == "api.turns"]
    assert [line.turn["outcome"] for line in lines] == [r.outcome.value for r in reports]  # type: ignore[attr-defined]
    assert lines[0].turn["request_id"] == ok.request_id  # type: ignore[attr-defined]


def test_pings_unknown_events_and_unicode_pass_through_untouched(live_app: StartApp) -> None:
    app = live_app()
    response = app.chat("u", "hi @@pings @@unicode")
    assert response.text == "echo: hi [turns=1] héllo 世界 🙂"
    assert app.history("u")[1]["content"] == "echo: hi [turns=1] héllo 世界 🙂"


def test_the_lock_is_renewed_while_a_long_reply_streams(live_app: StartApp) -> None:
    app = live_app(lock_ttl_seconds=0.6)
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.update(r=app.chat("long", "@@deltas=20 @@delay=0.1")))
    thread.start()
    time.sleep(1.2)  # twice the lock ttl into a two-second reply
    assert app.chat("long", "intruder").status_code == 409
    thread.join(10)
    assert result["r"].status_code == 200
    assert len(app.history("long")) == 2


@pytest.mark.parametrize("http", SERVERS)
def test_a_turn_whose_lock_was_taken_stops_its_reply_and_writes_nothing(
    live_app: StartApp, standin: StandInModel, rdb: sync_redis.Redis, prefix: str, http: Any
) -> None:
    """Another turn holds the session now (this one's lock lapsed while its worker was cut off):
    the reply is cut at once rather than paid for to the end, and its commit never happens."""
    app = live_app(http, lock_ttl_seconds=0.6)  # renewed every 0.2 s
    app.chat("taken", "before")
    history = app.history("taken")
    cancelled = standin.streams_cancelled
    lock = session_keys(prefix, "public", "taken").lock
    started = time.monotonic()
    with app.client.stream(
        "POST", "/chat/taken/stream", json={"message": "@@deltas=100 @@delay=0.05"}
    ) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        next(chunks)
        rdb.set(lock, "another-turn", px=10_000)
        with pytest.raises(httpx.RemoteProtocolError):  # the reply is cut, not ended
            for _ in chunks:
                pass
    assert time.monotonic() - started < 2.0  # not the reply's five seconds
    wait_until(lambda: standin.streams_cancelled > cancelled, 2.0, "the upstream stream to be closed")
    reports = app.wait_reports(2)
    assert reports[1].outcome is Outcome.UNKNOWN_ERROR and not reports[1].committed
    assert app.history("taken") == history
    assert rdb.get(lock) == "another-turn"  # the other turn's lock is left alone


def test_the_lock_is_kept_while_the_first_token_is_awaited(live_app: StartApp) -> None:
    """A slow first token (or the SDK's retries) must not let a second turn in meanwhile."""
    app = live_app(lock_ttl_seconds=0.6)
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.update(r=app.chat("slow", "hi @@first_delay=1.8")))
    thread.start()
    time.sleep(1.2)  # twice the lock ttl, and still no token
    assert app.chat("slow", "intruder").status_code == 409
    thread.join(10)
    assert result["r"].status_code == 200
    assert [m["content"] for m in app.history("slow")] == ["hi @@first_delay=1.8", "echo: hi [turns=1]"]


def test_a_client_that_leaves_while_sending_its_body_gets_one_outcome(live_app: StartApp) -> None:
    app = live_app()
    host, port = app.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /chat/s/stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 100\r\n\r\n{"message": "hal'
        )
        time.sleep(0.2)
    reports = app.wait_reports(1)
    assert reports[0].outcome is Outcome.CLIENT_DISCONNECTED_BEFORE_STREAMING
    # Nothing counts as in flight any more: a drain would not wait for it.
    metrics = app.client.get("/metrics").text
    assert "chat_streams_in_flight 0.0" in metrics


def test_a_reply_cut_mid_stream_is_not_logged_as_a_crash(
    live_app: StartApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = live_app(upstream_timeout_seconds=1.0)
    with caplog.at_level(logging.WARNING):
        read_cut_reply(app, "s", "cut @@drop_after=2")
        app.wait_reports(1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize("step", ["admit", "begin_turn"])
def test_a_lock_or_lease_taken_whose_reply_was_lost_is_given_back(
    live_app: StartApp, rdb: sync_redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Redis took the lease (or the lock) but its answer never arrived: the client gets a 503, and
    neither a stream of the caller's nor the session may then stay taken for a whole ttl."""
    real = ScriptCall.run
    lost: list[str] = []

    async def reply_lost(self: ScriptCall) -> Any:
        result = await real(self)
        if not lost and self.script.script == script_source(step):
            lost.append(step)
            # What the client raises when no reply comes within its time limit.
            raise RedisTimeoutError("no reply from Redis within 5 s")
        return result

    real_bundle = Bundle.run

    async def bundle_lost(self: Bundle, calls: list[ScriptCall], *, gated: bool = False) -> Any:
        # On one Redis, admission and the lock go in one script: its reply is what is lost.
        result = await real_bundle(self, calls, gated=gated)
        if not lost and any(call.script.script == script_source(step) for call in calls):
            lost.append(step)
            raise RedisTimeoutError("no reply from Redis within 5 s")
        return result

    app = live_app(lock_ttl_seconds=30, rate_limit_concurrent=1)
    monkeypatch.setattr(ScriptCall, "run", reply_lost)
    monkeypatch.setattr(Bundle, "run", bundle_lost)
    response = app.chat("s", "hi")
    assert response.status_code == 503 and response.json()["error"]["type"] == "unavailable"
    assert lost == [step]
    assert [k for k in rdb.scan_iter(f"{prefix}:*") if k.endswith(":lock")] == []
    streams = [k for k in rdb.scan_iter(f"{prefix}:*") if k.endswith(":streams")]
    assert all(rdb.zcard(k) == 0 for k in streams)
    # With one stream allowed, a lease left behind would refuse this turn with 429.
    assert app.chat("s", "again").status_code == 200


def test_a_lock_taken_by_a_turn_begun_with_an_unreadable_reply_is_given_back(
    live_app: StartApp, rdb: sync_redis.Redis, prefix: str
) -> None:
    """begin_turn.lua takes the lock before it reads the history; a history that cannot be read (here
    a key of the wrong type) fails the script after that. The 503 leaves no lock behind."""
    app = live_app(lock_ttl_seconds=30)
    keys = session_keys(prefix, "public", "odd")
    rdb.set(keys.history, "not a list")
    response = app.chat("odd", "hi")
    assert response.status_code == 503 and response.json()["error"]["type"] == "unavailable"
    assert rdb.get(keys.lock) is None


def test_a_reply_that_fails_before_its_first_text_is_asked_for_again(
    live_app: StartApp, standin: StandInModel, rdb: sync_redis.Redis, prefix: str
) -> None:
    """The API reports overload inside a 200 too; before any text reached the client, that is as
    retryable as a 529, and after the retries it is the same 503."""
    app = live_app(upstream_max_retries=2)
    app.chat("s", "before")
    before_state = redis_state(rdb, prefix)
    started = standin.streams_started
    response = app.chat("s", "x @@error_after=0")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["type"] == "unavailable"
    assert standin.streams_started - started == 3  # the first attempt and two retries
    assert redis_state(rdb, prefix) == before_state
