"""The commands a user runs: bad settings stop the process with one clear line; `chat-api dev` just works."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from api.config import STANDIN_KEY, Settings, load_settings
from tests.processes import ROOT, free_port, own_env, run_python, stop_process, wait_until


def run_serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_python(["-m", "api", "serve"], env)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "ANTHROPIC_API_KEY"),
        ({"ANTHROPIC_API_KEY": "k", "CHAT_MAX_TOKENS": "many"}, "CHAT_MAX_TOKENS"),
        ({"ANTHROPIC_API_KEY": "k", "CHAT_LOCK_TTL_SECONDS": "-1"}, "CHAT_LOCK_TTL_SECONDS"),
        # Above what a key's own streams_at_once may say: the same bound for both.
        ({"ANTHROPIC_API_KEY": "k", "CHAT_RATE_LIMIT_CONCURRENT": "1000001"}, "CHAT_RATE_LIMIT_CONCURRENT"),
        ({"ANTHROPIC_API_KEY": "k", "CHAT_API_KEYS": "short"}, "CHAT_API_KEYS"),
        ({"ANTHROPIC_API_KEY": "k", "CHAT_MODEL": "m-x", "CHAT_ALLOWED_MODELS": "m-y"}, "CHAT_MODEL"),
        ({"ANTHROPIC_API_KEY": "k", "REDIS_URL": "foo"}, "REDIS_URL"),
        ({"ANTHROPIC_API_KEY": "k", "REDIS_URL": "redis://:hunter2@/0"}, "REDIS_URL"),
        ({"ANTHROPIC_API_KEY": "k", "REDIS_URL": "unix://"}, "REDIS_URL"),
        ({"ANTHROPIC_API_KEY": "k", "REDIS_URL": "redis://redis:port/0"}, "REDIS_URL"),
        ({"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": "api.anthropic.com"}, "ANTHROPIC_BASE_URL"),
        ({"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": "https://"}, "ANTHROPIC_BASE_URL"),
    ],
)
def test_a_bad_setting_stops_serve_with_one_line_naming_it(env: dict[str, str], named: str) -> None:
    result = run_serve(env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    # The name itself, so that ANTHROPIC_BASE_URL is not passed off as CHAT_ANTHROPIC_BASE_URL.
    assert re.search(rf"\b{named}\b", lines[0]), lines[0]
    assert "Traceback" not in result.stderr
    # A URL may hold a password: the line names the variable, never its value.
    assert "hunter2" not in result.stderr


REAL_KEY = "sk-ant-api03-not-a-stand-in"


@pytest.mark.parametrize(
    "command",
    [["-m", "api", "serve"], ["-c", "from api.main import app"]],
    ids=["chat-api serve", "uvicorn api.main:app"],
)
def test_a_real_key_without_api_keys_stops_a_worker_with_one_line_naming_both(command: list[str]) -> None:
    result = run_python(command, {"ANTHROPIC_API_KEY": REAL_KEY})
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "ANTHROPIC_API_KEY" in line and "CHAT_API_KEYS" in line and "CHAT_ALLOW_OPEN_API=true" in line
    assert REAL_KEY not in result.stderr


def test_chat_api_dev_with_a_real_key_and_no_api_keys_refuses_too(redis_url: str, tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(ROOT), "ANTHROPIC_API_KEY": REAL_KEY, "REDIS_URL": redis_url}
    result = run_python(["-m", "api", "dev", "--port", str(free_port())], env, cwd=tmp_path)
    assert result.returncode == 2 and "CHAT_API_KEYS" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "env",
    [
        {"ANTHROPIC_API_KEY": REAL_KEY, "CHAT_ALLOW_OPEN_API": "true"},
        {"ANTHROPIC_API_KEY": REAL_KEY, "CHAT_API_KEYS": "client-key-0123456789"},
        {"ANTHROPIC_API_KEY": STANDIN_KEY},
    ],
    ids=["allowed open", "with api keys", "the stand-in's key"],
)
def test_a_worker_may_serve_with_api_keys_an_explicit_open_api_or_the_stand_in_key(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The same gate the processes above stop at (the tests' own workers pass it with the flag)."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in [*os.environ]:
        if name.startswith(("CHAT_", "ANTHROPIC_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert load_settings().api_key == env["ANTHROPIC_API_KEY"]


@pytest.mark.parametrize(
    "url", ["redis://redis:6379/0", "rediss://user:pw@cache.example:6380", "unix:///run/redis/redis.sock"]
)
def test_every_redis_url_form_is_accepted(url: str) -> None:
    assert Settings(anthropic_api_key="k", redis_url=url).redis_url == url


def test_settings_come_from_the_documented_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "secret-key")
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("CHAT_ALLOWED_MODELS", "a, b")
    monkeypatch.setenv("CHAT_MODEL", "b")
    monkeypatch.setenv("CHAT_MAX_TOKENS", "77")
    settings = Settings()
    assert settings.api_key == "secret-key"
    assert settings.redis_url == "redis://example:6380/2"
    assert settings.allowed_models == ["a", "b"]
    assert settings.max_tokens == 77
    assert "secret-key" not in repr(settings)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_dev_runs_with_nothing_but_the_package(tmp_path: Path, stop: int) -> None:
    """`chat-api dev` on a machine with no Redis and no key: embedded Redis, stand-in model; Ctrl-C
    (which reaches the embedded Redis too) or SIGTERM stops both, quietly."""
    port = free_port()
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api", "dev", "--port", str(port)],
            cwd=tmp_path,
            env=own_env(PYTHONPATH=str(ROOT)),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=1).status_code == 200, 30, "chat-api dev")
        first = httpx.post(f"{url}/chat/demo/stream", json={"message": "Hello there"}, timeout=20)
        assert first.status_code == 200
        assert first.text == "echo: Hello there [turns=1]"
        second = httpx.post(f"{url}/chat/demo/stream", json={"message": "again"}, timeout=20)
        assert second.text == "echo: again [turns=2]"
        page = httpx.get(f"{url}/", timeout=10)  # the chat page is on under `chat-api dev`
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert (tmp_path / ".chat-api").is_dir()
    finally:
        stop_process(proc, grace=10, sig=stop)
    output = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in output, output[-3000:]
    # The embedded Redis stopped with it rather than living on as an orphan.
    assert not [pid for pid in Path("/proc").glob("[0-9]*") if _cwd(pid).startswith(str(tmp_path))]
    assert f"{url}" in output and "curl" in output


def test_dev_listens_where_chat_host_and_chat_port_say(tmp_path: Path) -> None:
    """Without --host and --port, `chat-api dev` binds CHAT_HOST:CHAT_PORT, as `chat-api serve` does."""
    port = free_port()
    env = own_env(PYTHONPATH=str(ROOT), CHAT_HOST="127.0.0.1", CHAT_PORT=str(port))
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api", "dev"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=1).status_code == 200, 30, "chat-api dev")
        reply = httpx.post(f"{url}/chat/stream", json={"message": "on my port"}, timeout=20)
        assert reply.status_code == 200 and reply.text == "echo: on my port [turns=1]"
    finally:
        stop_process(proc, grace=10)
    assert f"serving on {url}" in log.read_text()


def _cwd(pid: Path) -> str:
    try:
        return os.readlink(pid / "cwd")
    except OSError:
        return ""


def test_dev_takes_redis_and_the_key_from_dotenv_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`chat-api dev` only brings its own Redis and model when neither the environment nor `.env`
    names one: the settings would read `.env`, and a key set there must not be silently ignored."""
    from api.dev.run import configured

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert not configured("ANTHROPIC_API_KEY")
    (tmp_path / ".env").write_text("ANTHROPIC_API_KEY=sk-from-dotenv\n")
    assert configured("ANTHROPIC_API_KEY")
    assert not configured("REDIS_URL")
