"""The chat page at `/` (`CHAT_WEB_UI`), driven in Debian's headless Chromium against real server processes."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from api.config import Settings
from tests.conftest import LiveApp
from tests.processes import ROOT, Worker, turn_in_flight

CHROMIUM = Path("/usr/bin/chromium")
KEY = "web-page-key-0123456789"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (.ci/run installs it); the page tests need it")
        pytest.skip("chromium is not installed (apt-get install chromium): the page tests need it")
    with sync_playwright() as playwright:
        # As root Chromium refuses its sandbox; the page is our own.
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser profile (empty storage), whose script errors and CSP violations fail the test."""
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    context.set_default_timeout(15_000)
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))

    def console(message: ConsoleMessage) -> None:
        # A failed response (a 409 or 429 the page handles) is logged by Chromium as an error too.
        if message.type == "error" and "Failed to load resource" not in message.text:
            problems.append(f"console: {message.text}")

    opened.on("console", console)
    try:
        yield opened
        assert not problems, problems
    finally:
        context.close()


@pytest.fixture(scope="module")
def servers(chat_servers: Callable[..., list[Worker]]) -> list[Worker]:
    """The server most tests use, one with a limit of one request a minute and one with a key, each
    for one test, started side by side."""
    return chat_servers(
        {"CHAT_WEB_UI": "true", "CHAT_UPSTREAM_MAX_RETRIES": "0"},
        {"CHAT_WEB_UI": "true", "CHAT_RATE_LIMIT_REQUESTS": "1"},
        {"CHAT_WEB_UI": "true", "CHAT_API_KEYS": KEY},
    )


@pytest.fixture
def server(servers: list[Worker]) -> Worker:
    return servers[0]


def send(page: Page, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")


def words(count: int) -> str:
    return " ".join(f"w{i}" for i in range(count))


def history(server: Worker, session: str, key: str | None = None) -> list[dict[str, str]]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{server.url}/chat/{session}/messages", headers=headers, timeout=10)
    response.raise_for_status()
    messages: list[dict[str, str]] = response.json()["messages"]
    return messages


def current_session(page: Page) -> str:
    session = page.evaluate("localStorage.getItem('chat-api.current')")
    assert isinstance(session, str) and session
    return session


def test_a_reply_streams_in_survives_a_reload_and_can_be_regenerated(
    page: Page, server: Worker, tmp_path: Path
) -> None:
    response = page.goto(f"{server.url}/")
    assert response is not None and response.ok
    assert "script-src 'self'" in response.headers["content-security-policy"]

    send(page, "hello there")
    replies = page.locator(".message.assistant")
    expect(replies.last).to_have_text("echo: hello there [turns=1]")
    expect(page.locator("#conversations button")).to_have_text(["hello there"])

    # Partial text on the page while the reply is still being generated.
    send(page, "@@deltas=40 @@delay=0.05 go")
    streaming = page.locator(".message.assistant.streaming")
    expect(streaming).to_contain_text("w3 ")
    assert "w39" not in streaming.inner_text()
    expect(page.locator(".message.assistant:not(.streaming)").last).to_have_text(words(40))

    # Model text is shown as text, never as markup.
    send(page, "<img src=x onerror=alert(1)><b>bold</b>")
    expect(replies.last).to_contain_text("<b>bold</b> [turns=3]")
    assert page.locator("#log img, #log b").count() == 0

    session = current_session(page)
    stored = history(server, session)
    page.reload()
    expect(page.locator(".message")).to_have_text([m["content"] for m in stored])
    assert len(stored) == 6
    page.screenshot(path=str(tmp_path / "web-chat.png"))

    page.click("#regenerate")
    expect(page.locator(".message.assistant.streaming")).to_have_count(0)
    expect(replies.last).to_have_text("echo: <img src=x onerror=alert(1)><b>bold</b> [turns=3]")
    again = history(server, session)
    assert len(again) == 6 and again[:5] == stored[:5]
    assert again[5]["id"] != stored[5]["id"], "the last reply was replaced"
    expect(page.locator(".message")).to_have_count(6)


def test_stop_and_a_cut_reply_are_marked_and_nothing_is_stored(page: Page, server: Worker) -> None:
    page.goto(f"{server.url}/")
    send(page, "first")
    expect(page.locator(".message.assistant").last).to_have_text("echo: first [turns=1]")
    session = current_session(page)

    send(page, "@@deltas=400 @@delay=0.05 long")
    expect(page.locator(".message.assistant.streaming")).to_contain_text("w2 ")
    page.click("#stop")
    stopped = page.locator(".message.assistant").last
    expect(stopped.locator(".note")).to_have_text(re.compile("^Stopped"))
    assert "w399" not in stopped.inner_text()
    # The next turn goes through at once: the stopped one let go of the conversation.
    send(page, "next")
    expect(page.locator(".message.assistant").last).to_have_text("echo: next [turns=2]")

    send(page, "@@deltas=10 @@delay=0.1 @@close_after=3 cut")
    cut = page.locator(".message.assistant").last
    expect(cut.locator(".note")).to_have_text(re.compile("^Incomplete: the reply was cut short"))
    # What came before the cut is shown. The third delta arrives with the cut itself, and a browser
    # may drop bytes that come with a network error, so it may or may not be there.
    expect(cut.locator(".text")).to_have_text(re.compile(r"^w0 w1( w2)?\s*$"), use_inner_text=True)
    expect(page.locator("#message")).to_have_value("@@deltas=10 @@delay=0.1 @@close_after=3 cut")
    assert [m["content"] for m in history(server, session)] == [
        "first",
        "echo: first [turns=1]",
        "next",
        "echo: next [turns=2]",
    ]


def test_a_busy_conversation_and_an_unavailable_model_are_said_plainly(page: Page, server: Worker) -> None:
    page.goto(f"{server.url}/")
    send(page, "hi")
    expect(page.locator(".message.assistant").last).to_have_text("echo: hi [turns=1]")
    session = current_session(page)

    with turn_in_flight(server.url, session):
        send(page, "me too")
        expect(page.locator("#status")).to_contain_text("busy with another reply")
        expect(page.locator(".message")).to_have_count(2)
        expect(page.locator("#message")).to_have_value("me too")

    send(page, "@@status=529 @@retry_after=2 overloaded")
    status = page.locator("#status")
    expect(status).to_contain_text("The service is unavailable")
    expect(status).to_contain_text(re.compile(r"Try again in [12] s"))
    expect(page.locator("#send")).to_be_disabled()
    expect(status).to_have_text("You can send again.")
    expect(page.locator("#send")).to_be_enabled()


def test_a_429_shows_a_countdown_from_retry_after(page: Page, servers: list[Worker]) -> None:
    limited = servers[1]
    page.goto(f"{limited.url}/")
    send(page, "one")
    expect(page.locator(".message.assistant").last).to_have_text("echo: one [turns=1]")
    send(page, "two")
    status = page.locator("#status")
    expect(status).to_contain_text("Too many requests")
    first = int(re.findall(r"Try again in (\d+) s", status.inner_text())[0])
    assert 30 < first <= 60
    expect(page.locator("#send")).to_be_disabled()
    expect(status).to_contain_text(re.compile(rf"Try again in (?!{first} s)\d+ s"))  # it counts down
    expect(page.locator(".message")).to_have_count(2)


def test_a_key_field_appears_when_the_api_has_keys(page: Page, servers: list[Worker]) -> None:
    keyed = servers[2]
    page.goto(f"{keyed.url}/")
    expect(page.locator("#key-box")).to_be_hidden()
    send(page, "let me in")
    expect(page.locator("#status")).to_contain_text("needs a key")
    expect(page.locator("#key-box")).to_be_visible()
    page.fill("#key", KEY)
    page.press("#key", "Tab")
    send(page, "let me in")
    expect(page.locator(".message.assistant").last).to_have_text("echo: let me in [turns=1]")
    assert page.evaluate("sessionStorage.getItem('chat-api.key')") == KEY
    assert KEY not in str(page.evaluate("JSON.stringify(localStorage)"))
    assert len(history(keyed, current_session(page), KEY)) == 2


def test_the_page_is_served_only_when_asked_for(live_app: Callable[..., LiveApp]) -> None:
    off = live_app().client
    response = off.get("/")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
    assert off.get("/web/app.js").status_code == 404

    on = live_app(web_ui=True).client
    page = on.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'src="web/app.js"' in page.text
    script = on.get("/web/app.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "innerHTML" not in script.text
    assert on.get("/web/style.css").headers["content-type"] == "text/css; charset=utf-8"
    missing = on.get("/web/secrets.txt")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    assert "/" not in on.get("/openapi.json").json()["paths"]


def test_compose_serves_the_page_unless_told_not_to() -> None:
    environment = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]["environment"]
    assert environment["CHAT_WEB_UI"] == "${CHAT_WEB_UI:-true}"
    assert Settings.model_fields["web_ui"].default is False, "off unless asked for, outside dev and compose"
