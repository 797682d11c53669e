"""`chat-api chat` under a pseudo-terminal, against real server processes on the stand-in model."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator

import httpx
import pexpect
import pytest

from tests.processes import ROOT, Worker, turn_in_flight

KEY = "terminal-client-key-0123"
PROMPT = "> "

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(chat_servers: Callable[..., list[Worker]]) -> list[Worker]:
    """The server most tests use, and one with a key and one request a minute, started side by side."""
    return chat_servers({}, {"CHAT_API_KEYS": KEY, "CHAT_RATE_LIMIT_REQUESTS": "1"})


@pytest.fixture
def server(servers: list[Worker]) -> Worker:
    return servers[0]


@pytest.fixture
def limited(servers: list[Worker]) -> Worker:
    return servers[1]


@pytest.fixture
def spawn() -> Iterator[Callable[..., pexpect.spawn]]:
    children: list[pexpect.spawn] = []

    def start(*args: str, **env: str) -> pexpect.spawn:
        base = {k: v for k, v in os.environ.items() if k != "CHAT_CLIENT_KEY"}
        child = pexpect.spawn(
            sys.executable,
            ["-m", "api", "chat", *args],
            cwd=str(ROOT),
            env={**base, "TERM": "dumb", **env},
            encoding="utf-8",
            timeout=20,
            dimensions=(50, 250),
        )
        children.append(child)
        return child

    yield start
    for child in children:
        child.close(force=True)  # by its PID: SIGHUP, then SIGINT, then SIGKILL


def history(server: Worker, session: str, key: str | None = None) -> list[dict[str, str]]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{server.url}/chat/{session}/messages", headers=headers, timeout=10)
    response.raise_for_status()
    messages: list[dict[str, str]] = response.json()["messages"]
    return messages


def opened(child: pexpect.spawn) -> str:
    child.expect(r"Conversation (\S+) at ")
    session: str = child.match.group(1)
    child.expect_exact(PROMPT)
    return session


def words(count: int) -> str:
    return " ".join(f"w{i}" for i in range(count))


def test_replies_stream_and_the_commands_work(spawn: Callable[..., pexpect.spawn], server: Worker) -> None:
    child = spawn("--url", server.url)
    session = opened(child)

    child.sendline("@@deltas=30 @@delay=0.05 hi")
    child.expect_exact("w3 ")
    assert "w29" not in child.buffer, "the reply is printed as it arrives, not at its end"
    child.expect_exact(" w28 w29 \r\n")
    child.expect_exact(PROMPT)
    first = history(server, session)

    child.sendline("/regenerate")
    child.expect_exact(words(30))
    child.expect_exact(PROMPT)
    again = history(server, session)
    assert len(again) == 2 and again[0] == first[0] and again[1]["id"] != first[1]["id"]

    child.sendline("/history")
    child.expect_exact("you: @@deltas=30 @@delay=0.05 hi")
    child.expect_exact(f"model: {words(30)}")
    child.expect_exact(PROMPT)

    child.sendline("/new")
    child.expect(r"Conversation (\S+)\r?\n")
    assert child.match.group(1) != session
    child.sendline("hello")
    child.expect_exact("echo: hello [turns=1]")
    child.sendline("/history")
    child.expect_exact("you: hello")
    child.expect_exact(PROMPT)

    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_reply_and_errors_are_one_line(
    spawn: Callable[..., pexpect.spawn], server: Worker
) -> None:
    child = spawn("--url", server.url, "--session", "terminal-stop")
    opened(child)

    child.sendline("@@deltas=400 @@delay=0.05 long")
    child.expect_exact("w2 ")
    child.sendintr()
    child.expect_exact("[stopped: this turn was not saved]")
    child.expect_exact(PROMPT)
    # Still running, and the conversation is free at once for the next turn.
    child.sendline("after")
    child.expect_exact("echo: after [turns=1]")
    child.expect_exact(PROMPT)

    child.sendline("@@deltas=10 @@delay=0.05 @@close_after=3 cut")
    child.expect_exact("w2 ")
    child.expect_exact("[the reply was cut short and this turn was not saved; send it again]")
    child.expect_exact(PROMPT)
    assert [m["content"] for m in history(server, "terminal-stop")] == ["after", "echo: after [turns=1]"]

    with turn_in_flight(server.url, "terminal-stop"):
        child.sendline("meanwhile")
        child.expect(r"error: 409 session_busy: [^\r\n]+\r?\n")
        child.expect_exact(PROMPT)

    child.sendline("/nonsense")
    child.expect_exact("unknown command /nonsense")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_keys_and_rate_limits(spawn: Callable[..., pexpect.spawn], limited: Worker) -> None:
    refused = spawn("--url", limited.url)
    refused.expect_exact("error: 401 authentication_error: ")
    refused.expect_exact("(pass --key or set CHAT_CLIENT_KEY)")
    refused.expect(pexpect.EOF)
    refused.wait()
    assert refused.exitstatus == 1

    child = spawn("--url", limited.url, CHAT_CLIENT_KEY=KEY)
    session = opened(child)
    child.sendline("one")
    child.expect_exact("echo: one [turns=1]")
    child.sendline("two")
    child.expect(r"error: 429 rate_limited: [^\r\n]+ \(retry in (\d+) s\)\r?\n")
    assert 30 < int(child.match.group(1)) <= 60
    child.expect_exact(PROMPT)
    assert len(history(limited, session, KEY)) == 2

    unreachable = spawn("--url", "http://127.0.0.1:9", "--key", KEY)
    unreachable.expect(re.escape("error: cannot reach http://127.0.0.1:9: ") + r"[^\r\n]+\r?\n")
    unreachable.expect(pexpect.EOF)
    unreachable.wait()
    assert unreachable.exitstatus == 1
