"""What operators watch: GET /metrics in the Prometheus text format, and log lines that carry the request id."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.ops.logs import REQUEST_ID, JsonFormatter, TextFormatter
from api.upstream.client import UPSTREAM_ERRORS
from tests.conftest import LiveApp
from tests.processes import free_port, wait_until
from tests.rawhttp import RawConnection, request

StartApp = Callable[..., LiveApp]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(app: LiveApp) -> Samples:
    response = app.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_count_outcomes_upstream_errors_tokens_and_times(live_app: StartApp) -> None:
    app = live_app(upstream_max_retries=0)
    assert app.chat("m1", "hello").status_code == 200
    assert app.chat("m1", "again").status_code == 200
    assert app.chat("m1", "   ").status_code == 400
    assert app.chat(None, "@@status=529").status_code == 503
    assert app.chat(None, "@@status=400").status_code == 502
    cut = False
    try:
        app.chat(None, "@@deltas=5 @@error_after=2")
    except httpx.RemoteProtocolError:
        cut = True
    assert cut
    reports = app.wait_reports(6)

    samples = scrape(app)
    assert value(samples, "chat_requests_total", outcome="success") == 2
    assert value(samples, "chat_requests_total", outcome="rejected") == 1
    assert value(samples, "chat_requests_total", outcome="upstream_error") == 3
    errors = {kind: value(samples, "chat_upstream_errors_total", type=kind) for kind in UPSTREAM_ERRORS}
    # 529 before the reply and an overloaded_error event in the middle of one; a 400 refusal.
    assert errors == dict.fromkeys(UPSTREAM_ERRORS, 0) | {"overloaded": 2, "refused": 1}
    tokens_in = value(samples, "chat_tokens_total", direction="input")
    tokens_out = value(samples, "chat_tokens_total", direction="output")
    assert tokens_in == sum(r.input_tokens for r in reports) > 0
    assert tokens_out == sum(r.output_tokens for r in reports) > 0
    # The two replies and the cut one started streaming; the refused requests never did.
    assert value(samples, "chat_time_to_first_token_seconds_count") == 3
    assert value(samples, "chat_stream_duration_seconds_count") == 3
    assert value(samples, "chat_stream_duration_seconds_sum") >= value(
        samples, "chat_time_to_first_token_seconds_sum"
    )
    assert value(samples, "chat_streams_in_flight") == 0
    assert value(samples, "chat_redis_errors_total") == 0


def test_streams_in_flight_counts_the_replies_being_served(live_app: StartApp) -> None:
    app = live_app()
    thread = threading.Thread(target=app.chat, args=("busy", "@@deltas=20 @@delay=0.05"))
    thread.start()
    try:
        wait_until(lambda: value(scrape(app), "chat_streams_in_flight") == 1, 5, "a stream in flight")
    finally:
        thread.join(10)
    assert value(scrape(app), "chat_streams_in_flight") == 0


def test_redis_errors_are_counted(live_app: StartApp) -> None:
    app = live_app(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_seconds=0.5)
    assert app.chat("down", "hello").status_code == 503
    assert app.client.get("/chat/down/messages").status_code == 503
    samples = scrape(app)
    assert value(samples, "chat_redis_errors_total") == 2
    assert value(samples, "chat_requests_total", outcome="unknown_error") == 1


def test_json_log_lines_carry_the_request_being_served() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("api", logging.WARNING, __file__, 1, "slow %s", ("redis",), None)
    token = REQUEST_ID.set("req-7")
    try:
        line = orjson.loads(formatter.format(record))
    finally:
        REQUEST_ID.reset(token)
    assert line["request_id"] == "req-7"
    assert line["message"] == "slow redis"
    assert line["level"] == "warning"
    assert "request_id" not in orjson.loads(formatter.format(record))  # outside any request


def test_each_request_logs_one_json_line_with_its_outcome_and_figures(
    live_app: StartApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = live_app(api_keys="key-one-0123456789")
    with caplog.at_level(logging.INFO, logger="api.turns"):
        response = app.client.post(
            "/chat/s/stream", json={"message": "hi"}, headers={"authorization": "Bearer key-one-0123456789"}
        )
        assert response.status_code == 200
        app.wait_reports(1)
    turns = [r for r in caplog.records if getattr(r, "turn", None) is not None]
    assert len(turns) == 1
    line = orjson.loads(JsonFormatter().format(turns[0]))
    assert line["message"] == "turn success"
    assert line["outcome"] == "success" and line["status"] == 200 and line["committed"] is True
    assert line["request_id"] == response.headers["x-request-id"] and line["session_id"] == "s"
    assert line["output_tokens"] > 0 and line["input_tokens"] > 0
    assert 0 < line["first_token_seconds"] <= line["duration_seconds"]
    assert line["duration_seconds"] == round(line["duration_seconds"], 4)
    assert "tenant" not in line  # derived from the API key: not for log files


# --- one record, one line, whatever a client sent -------------------------------------------------------

FORGED = "\n2026-01-01 00:00:00,000 INFO api.turns: turn success outcome=success"
UNPRINTABLE = ["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\t"]


def turn_record(**turn: object) -> logging.LogRecord:
    record = logging.LogRecord("api.turns", logging.INFO, __file__, 1, "turn %s", ("rejected",), None)
    record.turn = turn
    return record


def test_the_text_format_escapes_what_is_not_printable_in_every_value() -> None:
    formatter = TextFormatter()
    for char in UNPRINTABLE:
        record = logging.LogRecord(
            "api", logging.ERROR, __file__, 1, "in POST %s", (f"/chat/a{char}b",), None
        )
        text = formatter.format(record)
        assert text.splitlines() == [text] and text.isprintable(), repr(text)
        assert text.endswith(f"in POST /chat/a{repr(char)[1:-1]}b")
        text = formatter.format(turn_record(request_id=f"r{char}1", detail=f"bad{char}{FORGED}"))
        assert text.splitlines() == [text] and text.isprintable(), repr(text)


def test_a_text_field_cannot_pass_for_another_field() -> None:
    text = TextFormatter().format(turn_record(detail='unknown model "x" outcome=success', status=400))
    assert text.endswith(r' detail="unknown model \"x\" outcome=success" status=400'), text
    assert TextFormatter().format(turn_record(detail="a\\b")).endswith(r' detail="a\\b"')


def test_a_traceback_in_the_text_format_cannot_start_a_line_of_its_own() -> None:
    try:
        raise ValueError(f"bad id{FORGED}")
    except ValueError:
        record = logging.LogRecord("api", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    first, *rest = TextFormatter().format(record).split("\n")
    assert first.endswith("api: failed") and len(rest) > 2
    assert all(line.startswith("  ") for line in rest), rest
    assert any("turn success outcome=success" in line for line in rest)


def test_a_json_line_holds_any_value_on_one_line() -> None:
    for char in UNPRINTABLE:
        value = f"/chat/a{char}b{FORGED}"
        record = logging.LogRecord("api", logging.ERROR, __file__, 1, "in POST %s", (value,), None)
        record.turn = {"session_id": value}
        line = JsonFormatter().format(record)
        # str.splitlines() breaks at every line boundary Unicode knows (U+2028, NEL...), not only \n.
        assert line.splitlines() == [line], repr(line)
        parsed = orjson.loads(line)
        assert parsed["message"] == f"in POST {value}" and parsed["session_id"] == value


def test_what_a_client_sends_never_breaks_a_log_line(
    live_app: StartApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = live_app()
    with caplog.at_level(logging.DEBUG):
        for target, rid in [
            (b"/chat/a%0A2026-01-01%20INFO%20forged/stream", b"fine"),
            (b"/chat/ok/stream", b"x\ty\xe2\x80\xa8z"),
            (b"/chat/%0D%0A/messages", b"r"),
        ]:
            with RawConnection(app.url) as conn:
                method = "GET" if target.endswith(b"messages") else "POST"
                raw = request(
                    method,
                    target,
                    {"x-request-id": rid, "content-type": b"application/json"},
                    b'{"message":"hi"}' if method == "POST" else b"",
                )
                assert conn.request(raw).status in (200, 400)
        app.wait_reports(2)
    assert len(caplog.records) >= 2
    for record in caplog.records:
        text, line = TextFormatter().format(record), JsonFormatter().format(record)
        assert text.splitlines() == [text] and text.isprintable(), repr(text)
        assert line.splitlines() == [line], repr(line)
        assert "forged" not in text and "forged" not in line
