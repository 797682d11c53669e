"""The app against its own OpenAPI schema: generated requests, valid and not, never get a 5xx or an error
outside the documented shape. The examples are derived deterministically, so a failure shows on every run."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as sync_redis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.python import asgi

from api.config import Settings
from api.dev.standin import StandInModel
from api.main import create_app
from tests.conftest import LiveApp

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
