"""Resuming a reply from any worker, the disconnect grace period and idempotent turns, on real
`chat-api serve` processes sharing one real Redis, with the stand-in model counting its streams."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis

from api.dev.standin import StandInModel
from tests.processes import Worker, wait_until, workers

pytestmark = pytest.mark.slow

GRACE = 2.0
SLOW = "@@deltas=40 @@delay=0.05 @@unicode"


@pytest.fixture(scope="module")
def module_prefix(redis_url: str) -> Iterator[str]:
    name = "r" + uuid.uuid4().hex[:12]
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(f"{name}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module")
def deployment(
    redis_url: str, module_prefix: str, standin: StandInModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Worker]]:
    """Three workers, started side by side: two that the tests share, and one that a test kills (so
    that no test waits for a worker to start again)."""
    env = {
        "REDIS_URL": redis_url,
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": standin.url,
        "CHAT_REDIS_PREFIX": module_prefix,
        "CHAT_LOCK_TTL_SECONDS": "2",
        "CHAT_DISCONNECT_GRACE_SECONDS": str(GRACE),
    }
    with workers(3, env, tmp_path_factory.mktemp("logs")) as started:
        yield started


@pytest.fixture
def pair(deployment: list[Worker]) -> list[Worker]:
    return deployment[:2]


@pytest.fixture
def doomed(deployment: list[Worker]) -> Worker:
    return deployment[2]


@pytest.fixture
def session() -> str:
    return "s" + uuid.uuid4().hex[:16]


@pytest.fixture
def locks(redis_url: str, module_prefix: str) -> Iterator[Any]:
    client = redis.Redis.from_url(redis_url)

    def held(session: str) -> bool:
        return bool(list(client.scan_iter(f"{module_prefix}:*{session}}}:lock", count=1000)))

    yield held
    client.close()


class Streamed:
    """A chat POST read in a thread of its own: what its client received, and how it ended."""

    def __init__(
        self,
        url: str,
        message: str,
        *,
        key: str | None = None,
        leave_after: int | None = None,
        accept: str | None = None,
    ) -> None:
        self.url, self.message, self.key, self.leave_after = url, message, key, leave_after
        self.accept = accept
        self.body = b""
        self.status = 0
        self.headers: httpx.Headers | None = None
        self.complete = False
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        headers = {"idempotency-key": self.key} if self.key else {}
        if self.accept:
            headers["accept"] = self.accept
        try:
            with httpx.stream(
                "POST", self.url, json={"message": self.message}, headers=headers, timeout=30
            ) as response:
                self.status, self.headers = response.status_code, response.headers
                for piece in response.iter_raw():
                    self.body += piece
                    self.first.set()
                    if self.leave_after is not None and len(self.body) >= self.leave_after:
                        return  # closes the connection mid-reply
                self.complete = True
        except httpx.HTTPError:
            pass
        finally:
            self.first.set()

    def join(self) -> Streamed:
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self


def read_all(url: str, **kwargs: Any) -> tuple[int, bytes, bool]:
    """GET a resumed reply: its status, its body, and whether the body ended properly."""
    body = b""
    try:
        with httpx.stream("GET", url, timeout=30, **kwargs) as response:
            for piece in response.iter_raw():
                body += piece
            return response.status_code, body, True
    except httpx.HTTPError:
        return 200, body, False


def history(worker: Worker, session: str) -> list[str]:
    response = httpx.get(f"{worker.url}/chat/{session}/messages", timeout=5)
    return [m["content"] for m in response.json()["messages"]] if response.status_code == 200 else []


def test_a_reply_resumed_on_another_worker_is_what_its_client_got(pair: list[Worker], session: str) -> None:
    a, b = pair
    original = Streamed(f"{a.url}/chat/{session}/stream", SLOW)
    assert original.first.wait(10)
    status, resumed, complete = read_all(f"{b.url}/chat/{session}/stream")
    original.join()
    assert original.status == 200 and original.complete
    assert status == 200 and complete
    assert resumed == original.body
    assert "世界".encode() in resumed
    assert history(b, session)[-1] == original.body.decode()


def test_a_resume_from_an_offset_in_characters(pair: list[Worker], session: str) -> None:
    a, b = pair
    original = Streamed(f"{a.url}/chat/{session}/stream", SLOW)
    assert original.first.wait(10)
    status, resumed, complete = read_all(f"{b.url}/chat/{session}/stream", params={"offset": "7"})
    original.join()
    assert status == 200 and complete
    assert resumed.decode() == original.body.decode()[7:]


def test_a_reader_before_the_first_token_waits_for_it(pair: list[Worker], session: str, locks: Any) -> None:
    a, b = pair
    original = Streamed(f"{a.url}/chat/{session}/stream", "@@first_delay=1.5 @@deltas=5 @@delay=0.05")
    wait_until(lambda: locks(session), 10, "the turn to take its lock")
    assert not original.first.is_set()  # no token yet: the first comes 1.5 s after the headers
    status, resumed, complete = read_all(f"{b.url}/chat/{session}/stream")
    original.join()
    assert status == 200 and complete
    assert resumed == original.body == b"w0 w1 w2 w3 w4 "


def test_nothing_in_flight_is_204(pair: list[Worker], session: str) -> None:
    a, b = pair
    assert httpx.get(f"{b.url}/chat/{session}/stream", timeout=5).status_code == 204
    response = httpx.post(f"{a.url}/chat/{session}/stream", json={"message": "hi"}, timeout=10)
    assert response.status_code == 200
    after = httpx.get(f"{b.url}/chat/{session}/stream", timeout=5)
    assert after.status_code == 204 and after.content == b""


def test_a_bad_offset_is_a_400(pair: list[Worker], session: str) -> None:
    response = httpx.get(f"{pair[0].url}/chat/{session}/stream", params={"offset": "-1"}, timeout=5)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request"


def test_a_reader_in_the_grace_period_gets_the_whole_reply_and_it_is_stored(
    pair: list[Worker], session: str
) -> None:
    a, b = pair
    leaving = Streamed(f"{a.url}/chat/{session}/stream", SLOW, leave_after=10).join()
    assert not leaving.complete
    status, resumed, complete = read_all(f"{b.url}/chat/{session}/stream")
    assert status == 200 and complete
    assert resumed.startswith(leaving.body)
    stored = history(b, session)
    assert stored[-1] == resumed.decode()
    assert len(stored) == 2


def test_with_no_reader_the_grace_period_ends_in_a_cancel(
    pair: list[Worker], session: str, standin: StandInModel
) -> None:
    a, _ = pair
    cancelled = standin.streams_cancelled
    Streamed(f"{a.url}/chat/{session}/stream", "@@deltas=200 @@delay=0.05", leave_after=4).join()
    # The upstream keeps streaming through the grace period, then is closed: within GRACE + 1 s.
    wait_until(lambda: standin.streams_cancelled > cancelled, GRACE + 1, "the upstream to be closed")
    assert history(a, session) == []


def test_a_reader_of_a_killed_worker_gets_an_incomplete_body(
    doomed: Worker, pair: list[Worker], session: str, locks: Any
) -> None:
    a, b = doomed, pair[1]
    original = Streamed(f"{a.url}/chat/{session}/stream", "@@deltas=400 @@delay=0.05")
    assert original.first.wait(10)
    result: dict[str, Any] = {}
    got_some = threading.Event()

    def reader() -> None:
        body = b""
        try:
            with httpx.stream("GET", f"{b.url}/chat/{session}/stream", timeout=30) as response:
                result["status"] = response.status_code
                for piece in response.iter_raw():
                    body += piece
                    got_some.set()
            result["complete"] = True
        except httpx.HTTPError:
            result["complete"] = False
        result["body"] = body
        got_some.set()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert got_some.wait(10)
        a.kill()
        thread.join(10)  # the lock expires within its ttl (2 s); the reader ends within a poll of it
        assert not thread.is_alive()
        original.join()
        assert result["status"] == 200
        assert result["complete"] is False
        assert result["body"] and original.body.startswith(result["body"][:10])
        assert not locks(session)
    finally:
        a.stop()


def post(worker: Worker, session: str, message: str, key: str | None) -> httpx.Response:
    headers = {"idempotency-key": key} if key is not None else {}
    return httpx.post(
        f"{worker.url}/chat/{session}/stream", json={"message": message}, headers=headers, timeout=30
    )


def test_an_idempotent_repeat_after_the_commit_is_replayed(
    pair: list[Worker], session: str, standin: StandInModel
) -> None:
    a, b = pair
    started = standin.streams_started
    first = post(a, session, "hello", "k-1")
    again = post(b, session, "hello", '"k-1"')  # the same key, as a structured-field string
    assert first.status_code == again.status_code == 200
    assert again.content == first.content == b"echo: hello [turns=1]"
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert standin.streams_started == started + 1
    assert len(history(a, session)) == 2


def test_an_idempotency_key_with_another_body_is_422(pair: list[Worker], session: str) -> None:
    a, b = pair
    assert post(a, session, "hello", "k-2").status_code == 200
    other = post(b, session, "goodbye", "k-2")
    assert other.status_code == 422
    assert other.json()["error"]["type"] == "idempotency_mismatch"
    assert len(history(a, session)) == 2


def test_a_malformed_idempotency_key_is_400(pair: list[Worker], session: str) -> None:
    response = post(pair[0], session, "hello", "x" * 256)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request"


def test_concurrent_duplicates_make_one_upstream_call(
    pair: list[Worker], session: str, standin: StandInModel
) -> None:
    started = standin.streams_started
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(post, pair[n % 2], session, "@@deltas=20 @@delay=0.05", "k-3") for n in range(8)
        ]
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 8
    assert len({r.content for r in responses}) == 1
    assert responses[0].content.startswith(b"w0 w1 ")
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 7
    assert standin.streams_started == started + 1
    assert len(history(pair[0], session)) == 2


def test_a_cancelled_turn_gives_its_key_back(pair: list[Worker], session: str, locks: Any) -> None:
    a, b = pair
    message = "@@deltas=60 @@delay=0.05"  # 3 s: longer than the grace period, which cancels it
    Streamed(f"{a.url}/chat/{session}/stream", message, key="k-4", leave_after=4).join()
    wait_until(lambda: not locks(session), GRACE + 3, "the cancelled turn to end")
    retry = post(b, session, message, "k-4")
    assert retry.status_code == 200
    assert "idempotent-replayed" not in retry.headers
    assert retry.content.endswith(b"w59 ")


def test_a_failed_turn_gives_its_key_back(pair: list[Worker], session: str, locks: Any) -> None:
    a, b = pair
    message = "@@deltas=40 @@delay=0.05"
    doomed = Streamed(f"{a.url}/chat/{session}/stream", message, key="k-5")
    assert doomed.first.wait(10)
    # Deleting the session mid-reply makes the turn's commit fail: its reply ends incomplete.
    assert httpx.delete(f"{b.url}/chat/{session}", timeout=5).status_code in (204, 404)
    doomed.join()
    assert doomed.status == 200 and not doomed.complete
    retry = post(b, session, message, "k-5")
    assert retry.status_code == 200
    assert "idempotent-replayed" not in retry.headers
    assert history(b, session)[-1] == retry.text


def test_the_turn_report_says_whether_a_turn_was_resumed_or_replayed(live_app: Any) -> None:
    app = live_app(disconnect_grace_seconds=GRACE)
    sock = app.send_chat("/chat/rep/stream", SLOW)
    assert b"200 OK" in sock.recv(4096)
    sock.close()  # the client leaves mid-reply
    resumed = app.client.get("/chat/rep/stream")
    assert resumed.status_code == 200
    reports = app.wait_reports(1)
    assert (reports[0].outcome, reports[0].committed, reports[0].resumed) == ("success", True, True)
    assert app.history("rep")[-1]["content"] == resumed.text

    sock = app.send_chat("/chat/gone/stream", "@@deltas=200 @@delay=0.05")
    assert b"200 OK" in sock.recv(4096)
    sock.close()
    reports = app.wait_reports(2, timeout=GRACE + 3)
    assert (reports[1].outcome, reports[1].resumed) == ("client_disconnected_while_streaming", False)
    assert app.history("gone") == []

    first = app.client.post("/chat/idem/stream", json={"message": "hi"}, headers={"idempotency-key": "a"})
    again = app.client.post("/chat/idem/stream", json={"message": "hi"}, headers={"idempotency-key": "a"})
    assert first.text == again.text
    reports = app.wait_reports(4)
    assert (reports[2].replayed, reports[3].replayed) == (False, True)
    assert reports[3].input_tokens == reports[3].output_tokens == 0


def test_with_the_reply_log_off_nothing_is_resumed(live_app: Any) -> None:
    app = live_app(reply_log="off")
    sock = app.send_chat("/chat/off/stream", "@@deltas=20 @@delay=0.05")
    assert b"200 OK" in sock.recv(4096)
    assert app.client.get("/chat/off/stream").status_code == 204
    sock.close()


def events(body: bytes) -> list[tuple[int | None, Any]]:
    """An event stream's events as (id, data), `data` parsed from JSON except `[DONE]`."""
    found: list[tuple[int | None, Any]] = []
    for block in body.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        ident = next((int(line[4:]) for line in lines if line.startswith("id: ")), None)
        data = "".join(line[6:] for line in lines if line.startswith("data: "))
        found.append((ident, data if data == "[DONE]" else json.loads(data)))
    return found


def text_of(found: list[tuple[int | None, Any]]) -> str:
    return "".join(d["delta"] for _, d in found if isinstance(d, dict) and d.get("type") == "text-delta")


def test_an_event_stream_resumed_with_last_event_id_on_another_worker(
    pair: list[Worker], session: str
) -> None:
    a, b = pair
    original = Streamed(f"{a.url}/chat/{session}/stream", SLOW, accept="text/event-stream")
    assert original.first.wait(10)
    # No Accept: the resumed reply comes in the protocol the turn was started with.
    status, resumed, complete = read_all(f"{b.url}/chat/{session}/stream", headers={"last-event-id": "5"})
    original.join()
    assert original.status == 200 and original.complete and status == 200 and complete
    whole, tail = events(original.body), events(resumed)
    assert tail[-1] == (len(text_of(whole)), "[DONE]")
    assert [d["type"] for _, d in tail[-3:-1]] == ["text-end", "finish"]
    assert not any(isinstance(d, dict) and d["type"] in ("start", "text-start") for _, d in tail)
    assert text_of(tail) == text_of(whole)[5:]
    # Each event's id is the reply's characters so far, counted from the start of the whole reply.
    chars = 5
    for ident, data in tail:
        if isinstance(data, dict) and data["type"] == "text-delta":
            chars += len(data["delta"])
            assert ident == chars
    assert history(b, session)[-1] == text_of(whole)


def test_a_text_turn_resumed_as_events_when_accept_asks(pair: list[Worker], session: str) -> None:
    a, b = pair
    original = Streamed(f"{a.url}/chat/{session}/stream", SLOW)
    assert original.first.wait(10)
    status, resumed, complete = read_all(
        f"{b.url}/chat/{session}/stream", headers={"accept": "text/event-stream"}
    )
    original.join()
    assert status == 200 and complete
    found = events(resumed)
    assert [d["type"] for _, d in found[:2]] == ["start", "text-start"] and found[-1][1] == "[DONE]"
    assert text_of(found) == original.body.decode()


def test_an_idempotent_event_stream_repeat_is_replayed_as_events(
    pair: list[Worker], session: str, standin: StandInModel
) -> None:
    a, b = pair
    started = standin.streams_started
    headers = {"idempotency-key": "sse-1", "accept": "text/event-stream"}
    url = "/chat/" + session + "/stream"
    first = httpx.post(a.url + url, json={"message": "hi"}, headers=headers, timeout=30)
    again = httpx.post(b.url + url, json={"message": "hi"}, headers=headers, timeout=30)
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["content-type"].startswith("text/event-stream")
    assert text_of(events(again.content)) == text_of(events(first.content)) == "echo: hi [turns=1]"
    assert events(again.content)[-1][1] == "[DONE]"
    assert standin.streams_started == started + 1
