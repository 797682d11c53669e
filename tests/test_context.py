"""What the upstream is sent (the context window) and what its failures become for the client."""

from __future__ import annotations

import anthropic
import httpx2
import pytest

from api.chat import build_context, estimate_tokens
from api.errors import UpstreamFailed, UpstreamTimeout, UpstreamUnavailable
from api.upstream import open_error


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def test_the_whole_history_goes_when_it_fits() -> None:
    history = [msg("user", "a"), msg("assistant", "b")]
    assert build_context(history, "c", 1000) == [*history, msg("user", "c")]


def test_the_oldest_messages_are_dropped_first_and_the_context_opens_on_the_user() -> None:
    history = [msg("user", "x" * 400), msg("assistant", "y" * 40), msg("user", "q"), msg("assistant", "r")]
    # Room for the newest three but not the first: the assistant reply it answered goes too.
    budget = estimate_tokens("new") + sum(estimate_tokens(m["content"]) for m in history[1:])
    context = build_context(history, "new", budget)
    assert context == [msg("user", "q"), msg("assistant", "r"), msg("user", "new")]


def test_a_message_too_big_for_the_budget_still_goes_alone() -> None:
    assert build_context([msg("user", "a"), msg("assistant", "b")], "z" * 10_000, 10) == [
        msg("user", "z" * 10_000)
    ]


def status_error(
    cls: type[anthropic.APIStatusError], status: int, **headers: str
) -> anthropic.APIStatusError:
    request = httpx2.Request("POST", "http://upstream/v1/messages")
    response = httpx2.Response(status, headers=headers, request=request)
    body = {"type": "error", "error": {"type": "x", "message": f"upstream says {status}"}}
    return cls(f"Error code: {status}", response=response, body=body)


@pytest.mark.parametrize(
    ("error", "expected", "status", "kind"),
    [
        (
            status_error(anthropic.RateLimitError, 429, **{"retry-after": "7"}),
            UpstreamUnavailable,
            503,
            "rate_limited",
        ),
        (status_error(anthropic.OverloadedError, 529), UpstreamUnavailable, 503, "overloaded"),
        (status_error(anthropic.InternalServerError, 503), UpstreamUnavailable, 503, "overloaded"),
        (status_error(anthropic.InternalServerError, 504), UpstreamTimeout, 504, "timeout"),
        (status_error(anthropic.InternalServerError, 500), UpstreamFailed, 502, "server_error"),
        (status_error(anthropic.BadRequestError, 400), UpstreamFailed, 502, "refused"),
        (status_error(anthropic.AuthenticationError, 401), UpstreamFailed, 502, "refused"),
    ],
)
def test_upstream_statuses_map_to_the_documented_errors(
    error: anthropic.APIError, expected: type, status: int, kind: str
) -> None:
    mapped = open_error(error)
    assert isinstance(mapped, expected)
    assert mapped.status == status
    assert mapped.upstream_error == kind


def test_retry_after_from_the_upstream_is_passed_on() -> None:
    mapped = open_error(status_error(anthropic.RateLimitError, 429, **{"retry-after": "7"}))
    assert mapped.retry_after == 7


def test_an_unreachable_upstream_is_a_502_and_a_slow_one_a_504() -> None:
    request = httpx2.Request("POST", "http://upstream/v1/messages")
    assert open_error(anthropic.APIConnectionError(request=request)).status == 502
    assert open_error(anthropic.APITimeoutError(request=request)).status == 504
