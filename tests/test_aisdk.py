"""The AI SDK itself (the `ai` package from npm, run by Node) against a `chat-api serve` process: its
`DefaultChatTransport` with nothing but `<base>/chat`, its `TextStreamChatTransport` with nothing but
the session's URL, and the errors it shows. tests/aisdk/drive.mjs drives it; `.ci/run` installs it
(`npm ci` in tests/aisdk), for ai 6 and ai 7."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.dev.standin import StandInModel
from tests.processes import Worker

# Node and a server process start under the test: more than the suite's default minute on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent / "aisdk"


def node() -> str:
    found = shutil.which("node")
    missing = "Node" if found is None else "tests/aisdk/node_modules (npm ci in tests/aisdk)"
    if found is None or not (HERE / "node_modules" / "ai").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is required in CI (.ci/run installs it); the AI SDK tests need it")
        pytest.skip(f"{missing} is not installed: the AI SDK tests need it")
    return found


@pytest.fixture(scope="module")
def server(
    redis_url: str, standin: StandInModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    node()
    env = {
        "REDIS_URL": redis_url,
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": standin.url,
        "CHAT_REDIS_PREFIX": "aisdk" + uuid.uuid4().hex[:8],
        "CHAT_UPSTREAM_MAX_RETRIES": "0",
    }
    worker = Worker(env, tmp_path_factory.mktemp("aisdk") / "worker.log")
    try:
        worker.start(timeout=60)
        yield worker
    finally:
        worker.stop()


def drive(package: str, base: str) -> dict[str, Any]:
    prefix = "c" + uuid.uuid4().hex[:10]
    done = subprocess.run(
        [node(), "drive.mjs", package, base, prefix],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results: dict[str, Any] = json.loads(done.stdout)
    results["prefix"] = prefix
    return results


def texts(state: dict[str, Any]) -> list[tuple[str, str]]:
    return [(message["role"], message["text"]) for message in state["messages"]]


def stored(server: Worker, session: str) -> list[tuple[str, str]]:
    response = httpx.get(f"{server.url}/chat/{session}/messages", timeout=10)
    if response.status_code == 404:
        return []
    return [(message["role"], message["content"]) for message in response.json()["messages"]]


@pytest.mark.parametrize("package", ["ai", "ai-7"])
def test_the_ai_sdk_chats_with_no_glue(server: Worker, package: str) -> None:
    results = drive(package, server.url)
    prefix = results["prefix"]
    conversation = [
        ("user", "hello"),
        ("assistant", "echo: hello [turns=1]"),
        ("user", "again"),
        ("assistant", "echo: again [turns=2]"),
    ]

    sse = results["sse"]
    assert sse["first"]["status"] == "ready" and sse["first"]["error"] is None
    assert texts(sse["first"]) == conversation[:2]
    assert texts(sse["second"]) == conversation
    assert sse["regenerated"]["status"] == "ready" and texts(sse["regenerated"]) == conversation
    # The regenerated reply replaced the last one, in the SDK and in the store, under the id it was told.
    assert sse["regenerated"]["messages"][3]["id"] != sse["second"]["messages"][3]["id"]
    assert stored(server, f"{prefix}-sse") == conversation
    history = httpx.get(f"{server.url}/chat/{prefix}-sse/messages", timeout=10).json()["messages"]
    assert history[3]["id"] == sse["regenerated"]["messages"][3]["id"]

    text = results["text"]
    assert text["second"]["status"] == "ready" and texts(text["second"]) == conversation
    assert text["regenerated"]["status"] == "ready" and texts(text["regenerated"]) == conversation
    assert stored(server, f"{prefix}-text") == conversation

    for transport in ("sse", "text"):
        busy = results[f"busy_{transport}"]
        assert busy["busy"]["status"] == "error", transport
        assert json.loads(busy["busy"]["error"])["error"]["type"] == "session_busy"
        assert busy["slow"]["status"] == "ready" and busy["slow"]["error"] is None
        assert len(stored(server, f"{prefix}-busy-{transport}")) == 2

        cut = results[f"cut_{transport}"]
        assert cut["status"] == "error" and cut["error"], transport
        assert stored(server, f"{prefix}-cut-{transport}") == []

    resume = results["resume"]
    whole = " ".join(f"w{i}" for i in range(40)) + " "
    assert resume["first"]["status"] == "ready" and texts(resume["first"])[-1] == ("assistant", whole)
    assert resume["reloaded"]["status"] == "ready" and resume["reloaded"]["error"] is None
    assert texts(resume["reloaded"]) == [("assistant", whole)]
    assert resume["later"]["status"] == "ready" and resume["later"]["messages"] == []
    assert stored(server, f"{prefix}-resume")[-1] == ("assistant", whole)
