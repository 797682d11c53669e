"""Named keys with limits of their own, from a keys file that two real `chat-api serve` processes
follow while they run, mounted as Kubernetes mounts a ConfigMap (a symlink swapped on each update)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from api.config import Settings
from api.dev.standin import StandInModel
from tests.conftest import LiveApp
from tests.processes import Worker, wait_until, worker_env, workers
from tests.topologies import own_prefix

pytestmark = pytest.mark.slow

KEY_ENV = "env-key-0123456789abcdef"  # CHAT_API_KEYS: env-1
KEY_WEB = "web-key-0123456789abcdef"
KEY_BATCH = "batch-key-0123456789abcdef"
KEY_OLD = "old-key-0123456789abcdef"
KEY_NEW = "new-key-0123456789abcdef"
KEY_LONG = "long-key-0123456789abcdef"
ALL_KEYS = (KEY_ENV, KEY_WEB, KEY_BATCH, KEY_OLD, KEY_NEW, KEY_LONG)
DEFAULT_REQUESTS = 8  # CHAT_RATE_LIMIT_REQUESTS, for every key that does not say otherwise


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def table(name: str, key: str, **limits: int) -> str:
    lines = ["[[keys]]", f'name = "{name}"', f'key = "{key}"']
    lines += [f"{field} = {value}" for field, value in limits.items()]
    return "\n".join(lines) + "\n"


# What every version of the file below holds besides what a test adds: the keys of the limits test.
BASE = (
    table("web", KEY_WEB, streams_at_once=3, requests_per_minute=0)
    + table("batch", f"sha256:{sha(KEY_BATCH)}", requests_per_minute=5)
    + table("old", KEY_OLD)
    + table("long", KEY_LONG)
)


class ConfigMapMount:
    """A directory laid out as the kubelet lays out a mounted ConfigMap, updated as it updates one:
    keys.toml -> ..data/keys.toml, ..data -> ..<version>/, and a new ..data renamed over the old."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir()

    @property
    def path(self) -> Path:
        return self.root / "keys.toml"

    def publish(self, text: str) -> None:
        self.version += 1
        version = self.root / f"..v{self.version}"
        version.mkdir()
        (version / "keys.toml").write_text(text, encoding="utf-8")
        staged = self.root / "..data_tmp"
        staged.symlink_to(version.name)
        os.replace(staged, self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/keys.toml")


class Deployment:
    def __init__(self, workers: list[Worker], mount: ConfigMapMount) -> None:
        self.workers = workers
        self.mount = mount

    def authenticated(self, worker: Worker, key: str) -> bool:
        """Whether `worker` takes `key` now, asked in a way that spends none of its limits."""
        status = httpx.get(
            f"{worker.url}/chat/none/messages", headers={"x-api-key": key}, timeout=5
        ).status_code
        assert status in (401, 404), status
        return status == 404

    def wait_in_force(self, accepted: tuple[str, ...], refused: tuple[str, ...], what: str) -> float:
        """Seconds until every worker accepts `accepted` and refuses `refused`; at most 2 s, as promised."""
        began = time.monotonic()
        for worker in self.workers:
            wait_until(
                lambda w=worker: (
                    all(self.authenticated(w, k) for k in accepted)
                    and not any(self.authenticated(w, k) for k in refused)
                ),
                2.0 - (time.monotonic() - began),
                f"{what} on the worker on port {worker.port}",
            )
        return time.monotonic() - began

    def log_lines(self, worker: Worker) -> list[dict[str, object]]:
        lines = []
        for line in worker.log_text().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                lines.append(orjson.loads(line))
        return lines


@pytest.fixture(scope="module")
def deployment(
    redis_url: str, standin: StandInModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    mount = ConfigMapMount(tmp_path_factory.mktemp("config") / "mount")
    mount.publish(BASE)
    with own_prefix(redis_url) as prefix:
        env = worker_env(
            redis_url,
            standin.url,
            prefix,
            CHAT_API_KEYS=KEY_ENV,
            CHAT_API_KEYS_FILE=str(mount.path),
            CHAT_RATE_LIMIT_REQUESTS=str(DEFAULT_REQUESTS),
            CHAT_LOG_FORMAT="json",
            CHAT_LOG_LEVEL="debug",  # nothing the service logs may hold a key, at any level
        )
        with workers(2, env, tmp_path_factory.mktemp("logs")) as started:
            yield Deployment(started, mount)


def post_many(deployment: Deployment, key: str, count: int, message: str = "hi") -> list[httpx.Response]:
    """`count` chat requests at once, spread over both workers."""
    workers = deployment.workers

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        f"{workers[n % len(workers)].url}/chat/stream",
                        json={"message": message},
                        headers={"x-api-key": key},
                    )
                    for n in range(count)
                )
            )

    return asyncio.run(burst())


def test_a_key_with_its_own_limits_gets_exactly_its_count_while_another_keeps_the_default(
    deployment: Deployment,
) -> None:
    workers = deployment.workers
    # web: 3 streams at once. 10 concurrent long replies: exactly 3 stream, on whichever worker.
    statuses: list[int] = []
    lock, release = threading.Lock(), threading.Event()

    def stream(n: int) -> None:
        with httpx.stream(
            "POST",
            f"{workers[n % 2].url}/chat/stream",
            json={"message": "@@deltas=200 @@delay=0.05"},
            headers={"authorization": f"Bearer {KEY_WEB}"},
            timeout=30,
        ) as response:
            with lock:
                statuses.append(response.status_code)
            if response.status_code == 200:
                release.wait(30)  # holds its stream until every other request has its answer

    threads = [threading.Thread(target=stream, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(statuses) == 10, 20, "an answer to each of the 10 requests")
        assert sorted(statuses) == [200] * 3 + [429] * 7
        # Its request limit is 0 (none), overriding the default of 8: a burst of 12 more is refused
        # only for its streams, never for its requests.
        refused = post_many(deployment, KEY_WEB, 12)
        assert {r.status_code for r in refused} == {429}
        assert all("streaming at once" in r.json()["error"]["message"] for r in refused)
        assert all("ratelimit-limit" not in r.headers for r in refused)
    finally:
        release.set()
        for thread in threads:
            thread.join(30)

    # batch (configured by its digest): 5 requests a minute. env-1 keeps the default of 8.
    for key, limit in ((KEY_BATCH, 5), (KEY_ENV, DEFAULT_REQUESTS)):
        responses = post_many(deployment, key, 20)
        assert sorted(r.status_code for r in responses) == [200] * limit + [429] * (20 - limit)
        assert {r.headers["ratelimit-limit"] for r in responses} == {str(limit)}
        admitted = [r for r in responses if r.status_code == 200]
        assert sorted(int(r.headers["ratelimit-remaining"]) for r in admitted) == list(range(limit))


def test_a_key_added_and_one_removed_take_effect_on_every_worker_within_2_s(deployment: Deployment) -> None:
    deployment.wait_in_force((KEY_OLD, KEY_ENV), (KEY_NEW,), "the keys at start")
    deployment.mount.publish(BASE.replace(table("old", KEY_OLD), "") + table("new", KEY_NEW))
    took = deployment.wait_in_force((KEY_NEW, KEY_ENV, KEY_WEB), (KEY_OLD,), "the new file")
    print(f"a new keys file in force on both workers after {took:.2f} s")
    for worker in deployment.workers:
        reloads = [
            line["message"]
            for line in deployment.log_lines(worker)
            if str(line["message"]).startswith("keys file reloaded")
        ]
        assert "keys file reloaded: 5 keys; added: new; removed: old" in reloads
    deployment.mount.publish(BASE)
    deployment.wait_in_force((KEY_OLD,), (KEY_NEW,), "the first file again")


def test_a_stream_in_flight_is_not_cut_by_a_reload_that_removes_its_key(deployment: Deployment) -> None:
    worker = deployment.workers[0]
    deltas = 40
    with httpx.stream(
        "POST",
        f"{worker.url}/chat/kept/stream",
        json={"message": f"@@deltas={deltas} @@delay=0.1"},
        headers={"x-api-key": KEY_LONG},
        timeout=30,
    ) as reply:
        assert reply.status_code == 200
        chunks = reply.iter_text()
        received = next(chunks)
        deployment.mount.publish(BASE.replace(table("long", KEY_LONG), ""))
        deployment.wait_in_force((KEY_WEB,), (KEY_LONG,), "the file without the streaming key")
        received += "".join(chunks)  # raises if the reply is cut
    assert received == "".join(f"w{n} " for n in range(deltas))
    # Back in the file, the key finds its session with the turn committed: its tenant never changed.
    deployment.mount.publish(BASE)
    deployment.wait_in_force((KEY_LONG,), (), "the streaming key back")
    history = httpx.get(f"{worker.url}/chat/kept/messages", headers={"x-api-key": KEY_LONG}).json()
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
    assert history["messages"][1]["content"] == received


def test_a_broken_file_is_refused_in_one_log_line_and_the_keys_in_force_stay(deployment: Deployment) -> None:
    deployment.wait_in_force((KEY_OLD, KEY_WEB), (KEY_NEW,), "the first file")
    # A duplicate name, with the key that would have been added: nothing of this file is taken.
    deployment.mount.publish(BASE + table("web", KEY_NEW))
    expected = (
        f"keys file refused, the keys in force stay: {deployment.mount.path}: [[keys]] #5: the name 'web'"
    )

    def refusals(worker: Worker) -> list[dict[str, object]]:
        return [line for line in deployment.log_lines(worker) if str(line["message"]).startswith(expected)]

    for worker in deployment.workers:
        wait_until(lambda w=worker: bool(refusals(w)), 2, "the refusal in the log")
        assert not deployment.authenticated(worker, KEY_NEW)
        assert deployment.authenticated(worker, KEY_OLD) and deployment.authenticated(worker, KEY_WEB)
    # The next good file is taken; by then each worker has looked at the broken one several times
    # and said so once.
    deployment.mount.publish(BASE + table("new", KEY_NEW))
    deployment.wait_in_force((KEY_NEW, KEY_OLD), (), "the mended file")
    for worker in deployment.workers:
        [line] = refusals(worker)
        assert line["level"] == "error"
    deployment.mount.publish(BASE)
    deployment.wait_in_force((KEY_OLD,), (KEY_NEW,), "the first file again")


def test_logs_name_each_key_and_never_show_one(deployment: Deployment) -> None:
    for worker in deployment.workers:
        for key in (KEY_WEB, KEY_BATCH, KEY_ENV):
            httpx.post(
                f"{worker.url}/chat/stream", json={"message": "hi"}, headers={"x-api-key": key}, timeout=10
            )
    text = "\n".join(worker.log_text() for worker in deployment.workers)
    for secret in (*ALL_KEYS, *(sha(key) for key in ALL_KEYS)):
        assert secret not in text
    turns = [line for w in deployment.workers for line in deployment.log_lines(w) if "outcome" in line]
    assert {"web", "batch", "env-1"} <= {line["key"] for line in turns}


def test_turn_reports_name_the_key_and_a_key_moved_into_the_file_keeps_its_sessions(
    live_app: Callable[..., LiveApp], make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    before = live_app(api_keys=KEY_ENV)
    assert before.client.post(
        "/chat/moved/stream", json={"message": "first"}, headers={"x-api-key": KEY_ENV}
    ).is_success
    assert before.wait_reports(1)[0].key == "env-1"

    keys = tmp_path / "keys.toml"
    keys.write_text(table("mobile", KEY_ENV) + table("web", KEY_WEB), encoding="utf-8")
    after = live_app(api_keys_file=str(keys))
    assert after.client.post(
        "/chat/moved/stream", json={"message": "second"}, headers={"x-api-key": KEY_ENV}
    ).is_success
    assert after.client.post(
        "/chat/stream", json={"message": "hi"}, headers={"x-api-key": KEY_WEB}
    ).is_success
    refused = after.client.post("/chat/stream", json={"message": "hi"})
    assert refused.status_code == 401  # a keys file shuts the API, whatever it holds
    reports = after.wait_reports(3)
    # In the order they ended: a one-shot turn counts its usage after its last byte, so may end last.
    assert sorted(report.key or "" for report in reports) == ["", "mobile", "web"]
    history = after.client.get("/chat/moved/messages", headers={"x-api-key": KEY_ENV}).json()
    assert [m["content"] for m in history["messages"] if m["role"] == "user"] == ["first", "second"]
    assert all(KEY_ENV not in repr(report) and KEY_ENV not in str(report.as_dict()) for report in reports)


def test_a_changed_limit_reaches_admission_from_the_next_request(
    live_app: Callable[..., LiveApp], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(table("web", KEY_WEB, requests_per_minute=2), encoding="utf-8")
    app = live_app(api_keys_file=str(keys), rate_limit_requests=50)

    def turn() -> httpx.Response:
        return app.client.post("/chat/stream", json={"message": "hi"}, headers={"x-api-key": KEY_WEB})

    assert [turn().status_code for _ in range(3)] == [200, 200, 429]
    # As an editor saves: a new file renamed over the old one.
    staged = tmp_path / "keys.toml.new"
    staged.write_text(table("web", KEY_WEB, requests_per_minute=5), encoding="utf-8")
    os.replace(staged, keys)
    wait_until(lambda: turn().status_code == 200, 2, "the raised limit")  # a refused turn takes nothing
    # The bucket kept its level: the two turns before and this one leave exactly two of the five.
    rest = [turn() for _ in range(3)]
    assert [r.status_code for r in rest] == [200, 200, 429]
    assert {r.headers["ratelimit-limit"] for r in rest} == {"5"}
