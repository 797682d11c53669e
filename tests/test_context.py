"""What the upstream is sent (the context window) and what its failures become for the client."""

from __future__ import annotations

import itertools
import os
from typing import Any

import anthropic
import httpx2
import pytest
from opentelemetry import trace

import api.upstream.client as upstream_module
from api.config import Settings
from api.errors import UpstreamFailed, UpstreamTimeout, UpstreamUnavailable
from api.turn.context import build_context, estimate_tokens
from api.upstream.client import Upstream, open_error


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


def _spans_enabled(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> bool:
    for name in list(os.environ):
        if name.startswith(("OTEL_", "ANTHROPIC_OPEN_TELEMETRY")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    upstream = Upstream(Settings(anthropic_api_key="k", anthropic_base_url="http://127.0.0.1:9"))
    return bool(upstream.client.open_telemetry["traces"]["enabled"])


def test_the_sdk_spans_are_off_where_nothing_would_record_them(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not _spans_enabled(monkeypatch, {})


@pytest.mark.parametrize(
    "env", [{"OTEL_SERVICE_NAME": "chat"}, {"ANTHROPIC_OPEN_TELEMETRY_PROPAGATION": "true"}]
)
def test_the_sdk_spans_stay_on_where_open_telemetry_is_configured(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    assert _spans_enabled(monkeypatch, env)


def test_the_sdk_spans_stay_on_where_a_tracer_provider_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module.trace, "get_tracer_provider", trace.NoOpTracerProvider)
    assert _spans_enabled(monkeypatch, {})


def test_the_sdk_reads_its_own_switch_when_open_telemetry_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not _spans_enabled(monkeypatch, {"OTEL_SERVICE_NAME": "chat", "ANTHROPIC_OPEN_TELEMETRY": "false"})


def grow(turns: int, budget: int, *, stable: bool, cap: int = 10_000) -> list[list[dict[str, str]]]:
    """The context each of `turns` turns sends, the stored history capped at `cap` messages."""
    history: list[dict[str, Any]] = []
    sent = []
    for n in range(turns):
        text = f"message {n} " + "w " * 20
        capped = len(history) + 2 > cap
        sent.append(build_context(history, text, budget, stable=stable, capped=capped))
        history += [
            {"id": f"msg_{n}_u", "role": "user", "content": text},
            {"id": f"msg_{n}_a", "role": "assistant", "content": f"reply {n} " + "r " * 20},
        ]
        del history[: max(0, len(history) - cap)]
    return sent


def openings(sent: list[list[dict[str, str]]]) -> int:
    """How many turns opened on another message than the turn before: each one a new cache prefix."""
    return sum(1 for before, now in itertools.pairwise(sent) if before[0] != now[0])


@pytest.mark.parametrize(
    ("budget", "cap"), [pytest.param(200, 10_000, id="over-the-budget"), pytest.param(10**6, 12, id="capped")]
)
def test_a_trimmed_context_keeps_its_opening_for_several_turns_where_the_prompt_is_cached(
    budget: int, cap: int
) -> None:
    exact = grow(60, budget, stable=False, cap=cap)
    stable = grow(60, budget, stable=True, cap=cap)
    # Left to the budget alone the opening moves on nearly every turn once trimming starts: every
    # turn a cache write, never a read. In steps it moves about once in four turns.
    assert openings(exact) >= 45
    assert openings(stable) <= 25
    for context in stable:
        assert context[0]["role"] == "user"
        assert sum(estimate_tokens(m["content"]) for m in context) <= budget
    # It never leaves out more than the messages back to the previous checkpoint.
    assert min(len(c) for c in stable[-20:]) >= 3
