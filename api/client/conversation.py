"""One conversation with the chat API, over HTTP: new sessions, the history, and replies as they stream."""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import httpx

# After a reply was stopped, the server lets go of the conversation once it notices the closed
# connection, which may be a moment after the next turn was sent: a 409 then is retried this long.
_RELEASE_SECONDS = 3.0


class ApiError(Exception):
    """The API refused a request: its status, its error type and message, and the wait it asked for."""

    def __init__(self, status: int, type_: str, message: str, retry_after: int | None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.retry_after = status, type_, message, retry_after

    def __str__(self) -> str:
        wait = f" (retry in {self.retry_after} s)" if self.retry_after is not None else ""
        return f"{self.status} {self.type}: {self.message}{wait}"


class ReplyCut(Exception):
    """The reply ended without its final chunk: the server stored nothing of this turn."""


class Conversation:
    def __init__(self, url: str, key: str | None = None, session: str | None = None) -> None:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        # No read timeout: a reply may take long to begin, and the server bounds that wait itself.
        self.http = httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(10.0, read=None))
        self.session = session
        self._stopped_at = -_RELEASE_SECONDS

    def close(self) -> None:
        self.http.close()

    def start(self) -> str:
        """A new conversation (a server-made session id), which becomes this one."""
        response = self.http.post("/sessions", headers={"content-type": "application/json"})
        check(response)
        self.session = str(response.json()["session_id"])
        return self.session

    def history(self) -> list[dict[str, Any]]:
        response = self.http.get(f"/chat/{self.session}/messages")
        if response.status_code == 404:
            return []  # a session id of the user's own that has no turn yet
        check(response)
        messages: list[dict[str, Any]] = response.json()["messages"]
        return messages

    def reply(self, message: str | None) -> Generator[str, None, None]:
        """The reply's text as it arrives; `None` asks again for the last message (regenerate).
        Closing the iterator early closes the request, and the server stops the turn."""
        body = {"regenerate": True} if message is None else {"message": message}
        deadline = time.monotonic() + _RELEASE_SECONDS
        while True:
            with self.http.stream(
                "POST",
                f"/chat/{self.session}/stream",
                json=body,
                headers={"content-type": "application/json"},
            ) as response:
                recently_stopped = time.monotonic() - self._stopped_at < _RELEASE_SECONDS
                if response.status_code == 409 and recently_stopped and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                if response.status_code != 200:
                    response.read()
                    check(response)
                try:
                    yield from response.iter_text()
                except httpx.TransportError as exc:
                    self._stopped_at = time.monotonic()
                    raise ReplyCut(str(exc)) from None
                except BaseException:
                    # Ctrl-C, or the caller closed the iterator: the request is closed with it.
                    self._stopped_at = time.monotonic()
                    raise
                return


def check(response: httpx.Response) -> None:
    if response.is_success:
        return
    type_, message = "http_error", response.reason_phrase or "the request failed"
    try:
        error = response.json()["error"]
        type_, message = str(error["type"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass  # not the API's error shape (a proxy's page, say): the status says enough
    retry = response.headers.get("retry-after", "")
    raise ApiError(response.status_code, type_, message, int(retry) if retry.isdigit() else None)
