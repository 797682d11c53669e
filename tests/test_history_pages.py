"""`GET /chat/{id}/messages` in pages, on a real Redis and a real socket: the newest page first, each page
oldest first, `next_before` to walk back, and a 400 for every bad `limit` or `before`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis as sync_redis
from pydantic import ValidationError

from api.config import Settings
from api.http.auth import PUBLIC_TENANT
from api.store.history import stored_message
from api.store.keys import session_keys
from tests.conftest import LiveApp
from tests.test_requests import assert_error

StartApp = Callable[..., LiveApp]


@pytest.fixture
def app(live_app: StartApp) -> LiveApp:
    app = live_app(history_page_size=4, history_page_max=6)
    for n in range(5):  # ten messages
        assert app.chat("paged", f"question {n}").status_code == 200
    return app


def page(app: LiveApp, **query: Any) -> dict[str, Any]:
    response = app.client.get("/chat/paged/messages", params=query)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"session_id", "messages", "next_before"}
    return body


def test_the_default_page_is_the_newest_messages_oldest_first(app: LiveApp) -> None:
    newest = page(app)
    assert [m["role"] for m in newest["messages"]] == ["user", "assistant"] * 2
    assert [m["content"] for m in newest["messages"][::2]] == ["question 3", "question 4"]
    assert newest["next_before"] == newest["messages"][0]["id"]


def test_walking_next_before_reads_the_whole_history_once_in_order(app: LiveApp) -> None:
    pages, before = [], None
    while True:
        query = {"limit": 3} if before is None else {"limit": 3, "before": before}
        body = page(app, **query)
        pages.append(body["messages"])
        before = body["next_before"]
        if before is None:
            break
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    history = [m for p in reversed(pages) for m in p]
    assert [m["content"] for m in history[::2]] == [f"question {n}" for n in range(5)]
    assert len({m["id"] for m in history}) == 10
    # The largest page allowed holds six: the oldest four are left for the next.
    largest = page(app, limit=6)
    assert largest["messages"] == history[4:] and largest["next_before"] == history[4]["id"]


def test_a_page_before_the_oldest_message_is_empty(app: LiveApp) -> None:
    oldest = page(app, limit=6, before=page(app, limit=6)["next_before"])
    assert len(oldest["messages"]) == 4 and oldest["next_before"] is None
    assert page(app, before=oldest["messages"][0]["id"]) == {
        "session_id": "paged",
        "messages": [],
        "next_before": None,
    }


@pytest.mark.parametrize("limit", ["0", "-1", "7", "1.5", "x", "", " 3", "1e2", "99999999999"])
def test_a_bad_limit_is_a_400(app: LiveApp, limit: str) -> None:
    response = app.client.get("/chat/paged/messages", params={"limit": limit})
    assert "from 1 to 6" in assert_error(response, 400, "invalid_request")["error"]["message"]


@pytest.mark.parametrize("before", ["", "msg_{x}", "a" * 65, 'msg"', "msg_000000000000000000000000"])
def test_a_before_that_names_no_message_of_the_session_is_a_400(app: LiveApp, before: str) -> None:
    assert_error(app.client.get("/chat/paged/messages", params={"before": before}), 400, "invalid_request")


def test_a_message_of_another_session_is_no_cursor_here(app: LiveApp) -> None:
    assert app.chat("other", "elsewhere").status_code == 200
    theirs = app.client.get("/chat/other/messages").json()["messages"][0]["id"]
    response = app.client.get("/chat/paged/messages", params={"before": theirs})
    assert_error(response, 400, "invalid_request")


def test_an_unknown_session_is_still_a_404(app: LiveApp) -> None:
    assert_error(app.client.get("/chat/nobody/messages", params={"limit": 2}), 404, "not_found")


def test_a_session_with_no_messages_yet_has_an_empty_page(live_app: StartApp) -> None:
    app = live_app()
    created = app.client.post("/sessions").json()["session_id"]
    body = app.client.get(f"/chat/{created}/messages").json()
    assert body == {"session_id": created, "messages": [], "next_before": None}


def test_a_cursor_deep_in_a_long_history_is_found(
    live_app: StartApp, rdb: sync_redis.Redis, prefix: str
) -> None:
    """The cursor is searched for from the newest end, a window at a time, across many windows."""
    app = live_app(history_max_messages=200)
    assert app.chat("long", "first").status_code == 200
    key = session_keys(prefix, PUBLIC_TENANT, "long").history
    rdb.rpush(key, *(stored_message(f"m{n}", "user", f"m{n}", 0, 1) for n in range(150)))
    for cursor, expected in [("m2", ["m0", "m1"]), ("m0", None), ("m149", ["m147", "m148"])]:
        response = app.client.get("/chat/long/messages", params={"limit": 2, "before": cursor})
        assert response.status_code == 200, response.text
        contents = [m["content"] for m in response.json()["messages"]]
        if expected is None:  # just after the first turn: its two messages
            assert contents == ["first", contents[1]] and contents[1] != "m0"
        else:
            assert contents == expected


def test_the_default_page_size_may_not_exceed_the_largest() -> None:
    with pytest.raises(ValidationError, match="CHAT_HISTORY_PAGE_SIZE is above CHAT_HISTORY_PAGE_MAX"):
        Settings(anthropic_api_key="k", history_page_size=300, history_page_max=200)
