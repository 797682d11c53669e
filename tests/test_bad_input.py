"""Bad input on a real socket under the production protocol: every bad session id or header value gets
a clear 4xx in the error shape, is never echoed, logged or used as a key, and the connection lives on."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator

import pytest

from api.config import Settings
from api.dev.standin import StandInModel
from api.main import create_app
from api.outcomes import Outcome, TurnReport
from tests.conftest import LiveApp
from tests.processes import ThreadServer, wait_until
from tests.rawhttp import RawConnection, RawResponse, request

KEY = b"bad-input-key-0123456789"
AUTH = {"authorization": b"Bearer " + KEY}
BODY = b'{"message": "hello"}'
JSON = {"content-type": b"application/json"}
GENERATED = re.compile(r"[0-9a-f]{32}")

# Each as it appears in the request line; the server decodes the percent-escapes.
BAD_IDS = {
    "newline": b"a%0Ab",
    "carriage-return": b"a%0Db",
    "a-forged-header": b"a%0D%0AX-Forged:%20yes",
    "nul": b"a%00b",
    "tab": b"a%09b",
    "escape": b"a%1Bb",
    "delete": b"a%7Fb",
    "utf-8": b"caf%C3%A9",
    "not-utf-8": b"a%FFb",
    "line-separator": b"a%E2%80%A8b",
    "dot": b".",
    "dot-dot": b"..",
    "dot-inside": b"a.b",
    "space": b"a%20b",
    "129-characters": b"a" * 129,
}
ROUTES = {
    "stream": ("POST", b"/chat/%s/stream"),
    "messages": ("GET", b"/chat/%s/messages"),
    "delete": ("DELETE", b"/chat/%s"),
}


@pytest.fixture(scope="module")
def app(redis_url: str, standin: StandInModel) -> Iterator[LiveApp]:
    """One server for the module (a few hundred requests); tests find their turns by request id."""
    settings = Settings(
        anthropic_api_key="test-key",
        anthropic_base_url=standin.url,
        redis_url=redis_url,
        redis_prefix="t" + uuid.uuid4().hex[:12],
        api_keys=KEY.decode(),
        trusted_proxies="127.0.0.1/32",
        rate_limit_requests=0,
        rate_limit_tokens=0,
    )
    reports: list[TurnReport] = []
    with ThreadServer(create_app(settings, on_turn_end=reports.append)) as server:
        live = LiveApp(server, reports)
        yield live
        live.client.close()


def report_of(app: LiveApp, request_id: str) -> TurnReport:
    found: list[TurnReport] = []

    def arrived() -> bool:
        found[:] = [report for report in app.reports if report.request_id == request_id]
        return bool(found)

    wait_until(arrived, 5, f"the report of request {request_id}")
    return found[0]


@pytest.fixture
def conn(app: LiveApp) -> Iterator[RawConnection]:
    with RawConnection(app.url) as connection:
        yield connection


def route_request(route: str, session_id: bytes, headers: dict[str, bytes] | None = None) -> bytes:
    method, path = ROUTES[route]
    body = BODY if method == "POST" else b""
    return request(method, path % session_id, {**AUTH, **JSON, **(headers or {})}, body)


def assert_alive(conn: RawConnection) -> None:
    """The same connection still serves: a second, valid request after the bad one is answered."""
    response = conn.request(request("GET", b"/healthz"))
    assert response.status == 200 and response.body == b'{"status":"ok"}'


def assert_refused(response: RawResponse, status: int, type_: str) -> None:
    assert response.status == status, response
    assert response.error()["type"] == type_
    assert GENERATED.fullmatch(response.headers["x-request-id"])


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("session_id", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_a_bad_session_id_is_400_on_every_route_and_the_connection_lives(
    app: LiveApp, conn: RawConnection, route: str, session_id: bytes
) -> None:
    response = conn.request(route_request(route, session_id))
    assert_refused(response, 400, "invalid_request")
    assert "x-session-id" not in response.headers and "x-forged" not in response.headers
    assert response.headers.get("connection") != "close"
    assert_alive(conn)
    if route == "stream":
        report = report_of(app, response.headers["x-request-id"])
        assert (report.outcome, report.status) == (Outcome.REJECTED, 400)
        assert report.session_id is None  # the turn's log line never holds the refused id


@pytest.mark.parametrize("route", ROUTES)
def test_the_longest_id_of_every_allowed_character_is_served(conn: RawConnection, route: str) -> None:
    session_id = ((b"Az09_-" + uuid.uuid4().hex.encode()) * 4)[:128]
    first = conn.request(route_request(route, session_id))
    # A turn creates the session; reading or deleting one that was never made is a 404.
    assert first.status == (200 if route == "stream" else 404), first
    if route == "stream":
        assert first.headers["x-session-id"] == session_id.decode()
    assert_alive(conn)


def test_raw_bytes_outside_ascii_in_the_path_get_the_error_shape(app: LiveApp) -> None:
    """The parser refuses a request line that is not ASCII before the app sees it (HTTP/1.1 allows
    none there: a client percent-encodes them). The answer is still the API's 400, and says it closes."""
    for route in ROUTES:
        with RawConnection(app.url) as conn:
            response = conn.request(route_request(route, "café".encode()))
            assert_refused(response, 400, "invalid_request")
            assert response.headers["connection"] == "close" and conn.closed_by_server()
    with RawConnection(app.url) as conn:
        assert_alive(conn)  # the server itself is unharmed


# --- header values --------------------------------------------------------------------------------------

# Values the HTTP grammar allows in a header (obs-text, tabs, spaces), which the app must judge.
ODD_VALUES = {
    "space": b"a b",
    "tab": b"a\tb",
    "latin-1": "café".encode("latin-1"),
    "utf-8": "café".encode(),
    "high-byte": b"\xff\xfe",
    "long": b"r" * 129,
    "path": b"../../etc",
    "braces": b"{x}",
}
# Values HTTP/1.1 forbids in a header: the parser refuses them before the app is called.
CONTROL_VALUES = {"nul": b"a\x00b", "cr": b"a\rb", "soh": b"\x01", "escape": b"a\x1bb", "delete": b"a\x7fb"}
HEADERS = ["x-request-id", "authorization", "x-api-key", "x-forwarded-for", "content-type", "accept"]


@pytest.mark.parametrize("value", ODD_VALUES.values(), ids=ODD_VALUES.keys())
def test_a_refused_request_id_is_replaced_by_a_generated_one(
    app: LiveApp, conn: RawConnection, value: bytes
) -> None:
    for route, session_id in (("stream", b"rid"), ("messages", b"rid"), ("delete", b"nobody")):
        response = conn.request(route_request(route, session_id, {"x-request-id": value}))
        assert response.status in (200, 204, 404), response
        assert GENERATED.fullmatch(response.headers["x-request-id"])
        if route == "stream":
            # The turn, its log line and its hook all know the request by the generated id.
            assert report_of(app, response.headers["x-request-id"]).outcome is Outcome.SUCCESS
    health = conn.request(request("GET", b"/healthz", {"x-request-id": value}))
    assert health.status == 200 and GENERATED.fullmatch(health.headers["x-request-id"])


def test_a_sane_request_id_is_kept(conn: RawConnection) -> None:
    response = conn.request(route_request("stream", b"kept", {"x-request-id": b"trace.42:a-b_c"}))
    assert response.status == 200 and response.headers["x-request-id"] == "trace.42:a-b_c"


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
@pytest.mark.parametrize("value", ODD_VALUES.values(), ids=ODD_VALUES.keys())
def test_an_odd_api_key_is_401_on_every_route(conn: RawConnection, header: str, value: bytes) -> None:
    presented = b"Bearer " + value if header == "authorization" else value
    for route in ROUTES:
        method, path = ROUTES[route]
        raw = request(method, path % b"s", {header: presented, **JSON}, BODY if method == "POST" else b"")
        response = conn.request(raw)
        assert_refused(response, 401, "authentication_error")
        assert response.headers.get("connection") != "close"
    assert_alive(conn)


@pytest.mark.parametrize("header", ["x-forwarded-for", "content-type", "accept"])
@pytest.mark.parametrize("value", ODD_VALUES.values(), ids=ODD_VALUES.keys())
def test_odd_values_of_the_other_headers_are_no_failure(
    conn: RawConnection, header: str, value: bytes
) -> None:
    for route in ROUTES:
        response = conn.request(route_request(route, b"odd", {header: value}))
        assert response.status < 500, response
        if response.status >= 400:
            response.error()
    assert_alive(conn)


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("value", CONTROL_VALUES.values(), ids=CONTROL_VALUES.keys())
def test_a_control_character_in_a_header_is_400_in_the_error_shape(
    app: LiveApp, header: str, value: bytes
) -> None:
    """HTTP/1.1 forbids these in a header value, so the parser stops at them: the request is answered
    with the API's 400 and then closed, as where the next one begins cannot be known."""
    with RawConnection(app.url) as conn:
        response = conn.request(route_request("stream", b"ctl", {header: value}))
        assert_refused(response, 400, "invalid_request")
        assert response.headers["connection"] == "close" and conn.closed_by_server()


@pytest.mark.parametrize("length", [b"\xb2", b"-1", b"1 1", b"0x10", b""])
def test_a_bad_content_length_is_400_in_the_error_shape(app: LiveApp, length: bytes) -> None:
    raw = (
        b"POST /chat/len/stream HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\ncontent-length: %s\r\n\r\n"
    )
    with RawConnection(app.url) as conn:
        response = conn.request(raw % (KEY, length) + BODY)
        assert_refused(response, 400, "invalid_request")
        assert response.headers["connection"] == "close"


def test_a_zone_in_a_forwarded_address_is_not_part_of_the_caller(
    live_app: Callable[..., LiveApp],
) -> None:
    """On an open API the limits are keyed by the caller's address; a zone after '%' is free text (any
    byte, braces too) and must not reach a Redis key, nor make two callers of one address."""
    app = live_app(trusted_proxies="127.0.0.1/32", rate_limit_requests=1)
    with RawConnection(app.url) as conn:
        first = conn.request(route_request("stream", b"z1", {"x-forwarded-for": b"fe80::1%{a}\xff"}))
        assert first.status == 200, first
        second = conn.request(route_request("stream", b"z2", {"x-forwarded-for": b"fe80::1%other"}))
        assert_refused(second, 429, "rate_limited")  # the same caller: fe80::1
