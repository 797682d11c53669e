"""The app against its own OpenAPI schema: generated requests, valid and not, never get a 5xx or an error
outside the documented shape; and on a real socket under the production protocol, paths and headers
holding control characters and bytes outside ASCII on every route never get a 5xx, an error outside
the shape or a dropped connection. The examples are derived deterministically, so a failure shows on
every run."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as sync_redis
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance
from schemathesis.python import asgi

from api.config import Settings
from api.dev.standin import StandInModel
from api.main import create_app
from api.outcomes import TurnReport
from tests.conftest import LiveApp
from tests.processes import ThreadServer
from tests.rawhttp import RawConnection, request

KEY = "fuzz-key-0123456789abcdef"


class AppUnderTest:
    """Where the fuzzer's requests go (its checks' own probes too): the app the fixture built."""

    app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


# The schema is the app's own; building an app connects to nothing, so it can be read at import.
schema = schemathesis.openapi.from_dict(create_app(Settings(anthropic_api_key="schema-only")).openapi())
schema.app = target = AppUnderTest()
# Requests carry a valid key (below), so that they reach past authentication; the `ignored_auth` check
# still sends each one without it and with a wrong one, and expects a 401.
schema.config.generation.update(with_security_parameters=False)
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def app(redis_url: str, standin: StandInModel) -> Iterator[Any]:
    prefix = "t" + uuid.uuid4().hex[:12]
    app = create_app(
        Settings(
            anthropic_api_key="test-key",
            anthropic_base_url=standin.url,
            redis_url=redis_url,
            redis_prefix=prefix,
            upstream_timeout_seconds=5.0,
            api_keys=KEY,
            rate_limit_requests=100_000,
            rate_limit_tokens=10_000_000,
            rate_limit_concurrent=100,
            worker_max_streams=100,
            max_body_bytes=4096,
        )
    )
    target.app = app
    yield app
    asgi.shutdown_lifespans()  # the fuzzer's client ran the app's lifespan; end it, closing its clients
    client = sync_redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@schema.parametrize()
@settings(
    max_examples=40, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
def test_no_request_gets_a_5xx_or_an_undocumented_error(app: Any, case: Any) -> None:
    response = case.call(headers=AUTH)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == ["application/json"]
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
        assert all(isinstance(value, str) and value for value in body["error"].values())
    # A request the schema allows may still be refused with a 400 (a model not in the allowed list,
    # nothing to regenerate...), so the check that expects it to succeed does not apply.
    case.validate_response(
        response,
        headers=AUTH,
        excluded_checks=[positive_data_acceptance],
    )


def test_a_temperature_reaches_claude(live_app: Callable[..., LiveApp], standin: StandInModel) -> None:
    """The SDK's `create()` no longer takes `temperature`; passing it made every such turn a 500."""
    app = live_app()
    response = app.chat(None, "warm", temperature=0.3)
    assert response.status_code == 200, response.text
    sent = standin.requests[-1].body
    assert sent is not None and sent["temperature"] == 0.3


# --- paths and headers on a real socket -----------------------------------------------------------------

SESSION_ROUTES = [("POST", b"/chat/%s/stream"), ("GET", b"/chat/%s/messages"), ("DELETE", b"/chat/%s")]
OTHER_ROUTES = [
    ("POST", b"/chat/stream"),
    ("POST", b"/sessions"),
    ("GET", b"/healthz"),
    ("GET", b"/readyz"),
    ("GET", b"/metrics"),
]
routes = st.one_of(st.sampled_from(SESSION_ROUTES), st.sampled_from(OTHER_ROUTES))
HEADERS = [
    "x-request-id",
    "authorization",
    "x-api-key",
    "x-forwarded-for",
    "content-type",
    "accept",
    "x-other",
]
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# A session id as it may appear in a request line. Legal characters and any byte percent-encoded reach
# the app (which sees control characters, '/', '%' and non-ASCII once decoded); raw bytes that HTTP
# forbids there (control characters, space, non-ASCII) are refused by the parser. Raw CR and LF are
# left out: they would end the request line.
legal = st.sampled_from([b"a", b"Z", b"0", b"-", b"_", b".", b"~", b"%", b"?", b"#", b"/", b";", b"@"])
encoded = st.integers(0, 255).map(lambda byte: b"%%%02X" % byte)
raw = st.integers(0, 255).filter(lambda byte: byte not in b"\r\n").map(lambda byte: bytes([byte]))
session_ids = st.one_of(
    st.lists(st.one_of(legal, encoded), max_size=40).map(b"".join),
    st.lists(st.one_of(legal, encoded, raw), min_size=1, max_size=40).map(b"".join),
    st.integers(120, 140).map(lambda n: b"s" * n),
)
# Text a client library would send (any Latin-1 or UTF-8 character, control characters aside), which
# the app must judge; or any bytes at all but LF, which would end the header line.
header_values = st.one_of(
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=48
    ).map(lambda text: text.encode("latin-1")),
    st.text(st.characters(min_codepoint=0x20, exclude_categories=["Cs", "Cc"]), max_size=24).map(str.encode),
    st.binary(max_size=48).map(lambda value: value.replace(b"\n", b"")),
)


@pytest.fixture(scope="module")
def socket_app(redis_url: str, standin: StandInModel) -> Iterator[LiveApp]:
    prefix = "t" + uuid.uuid4().hex[:12]
    settings_ = Settings(
        anthropic_api_key="test-key",
        anthropic_base_url=standin.url,
        redis_url=redis_url,
        redis_prefix=prefix,
        api_keys=KEY,
        trusted_proxies="127.0.0.1/32",
        rate_limit_requests=0,
        rate_limit_tokens=0,
        rate_limit_concurrent=0,
    )
    reports: list[TurnReport] = []
    with ThreadServer(create_app(settings_, on_turn_end=reports.append)) as server:
        live = LiveApp(server, reports)
        yield live
        live.client.close()
    client = sync_redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.mark.timeout(180)  # a few hundred connections: bounded, with room for a loaded machine
@given(
    route=routes,
    session_id=session_ids,
    headers=st.dictionaries(st.sampled_from(HEADERS), header_values, max_size=3),
)
@settings(
    max_examples=200, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
def test_odd_paths_and_headers_on_every_route_get_an_answer_in_shape(
    socket_app: LiveApp, route: tuple[str, bytes], session_id: bytes, headers: dict[str, bytes]
) -> None:
    method, template = route
    target = template % session_id if b"%s" in template else template
    sent = {"authorization": b"Bearer " + KEY.encode(), "content-type": b"application/json", **headers}
    body = b'{"message": "hi"}' if method == "POST" else b""
    with RawConnection(socket_app.url) as conn:
        response = conn.request(request(method, target, sent, body))  # a dropped connection raises here
        event(f"{response.status} {response.headers.get('connection', 'kept')}")
        assert response.status < 500, response
        assert SANE_REQUEST_ID.fullmatch(response.headers["x-request-id"]), response.headers
        if response.status >= 400:
            response.error()
        if response.headers.get("connection") == "close":
            # Only a request the HTTP parser refused is closed, and only after its answer.
            assert response.status == 400 and response.error()["type"] == "invalid_request", response
            assert conn.closed_by_server()
        else:
            again = conn.request(request("GET", b"/healthz"))
            assert again.status == 200, again
