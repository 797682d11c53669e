"""API keys and tenancy: who may call, and whose sessions a caller can see."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable

import fakeredis
import httpx
import pytest

from api.config import Settings
from api.http.auth import Authenticator
from api.keyring import env_keys
from api.main import create_app
from api.outcomes import Outcome, TurnReport
from tests.conftest import LiveApp, asgi_client
from tests.test_requests import assert_error

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
KEY_C = "key-c-0123456789abcdef"  # configured by its digest only
KEYS = f"{KEY_A}, {KEY_B}, sha256:{hashlib.sha256(KEY_C.encode()).hexdigest()}"

StartApp = Callable[..., LiveApp]


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def keyed(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[tuple[httpx.AsyncClient, list[TurnReport]]]:
    reports: list[TurnReport] = []
    redis = fakeredis.FakeAsyncRedis()
    app = create_app(make_settings(api_keys=KEYS), on_turn_end=reports.append, redis=redis)
    async with asgi_client(app) as http:
        yield http, reports
    await redis.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("key-x-0123456789abcdef"),
        bearer(KEY_A[:-1]),
        bearer(KEY_A + "0"),
        bearer(""),
        {"authorization": KEY_A},  # no scheme
        {"authorization": f"Basic {KEY_A}"},
        {"x-api-key": "nope"},
        {"x-api-key": hashlib.sha256(KEY_C.encode()).hexdigest()},  # the digest is not the key
        {"authorization": "Bearer wrong-key-0123456789", "x-api-key": KEY_A},
    ],
)
async def test_a_missing_or_wrong_key_is_401_on_every_chat_route(
    keyed: tuple[httpx.AsyncClient, list[TurnReport]], headers: dict[str, str]
) -> None:
    http, reports = keyed
    requests = [
        ("POST", "/chat/s/stream", {"message": "hi"}),
        ("POST", "/chat/stream", {"message": "hi"}),
        ("GET", "/chat/s/messages", None),
        ("DELETE", "/chat/s", None),
        ("POST", "/sessions", None),
    ]
    secrets = [part for value in headers.values() for part in value.split() if len(part) >= 16]
    for method, path, body in requests:
        response = await http.request(method, path, json=body, headers=headers)
        error = assert_error(response, 401, "authentication_error")
        assert response.headers["www-authenticate"] == "Bearer"
        assert not any(secret in error["error"]["message"] for secret in secrets)
    # Each refused turn ends with one outcome, like any other request refused before streaming.
    assert [(r.outcome, r.status) for r in reports] == [(Outcome.REJECTED, 401)] * 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [bearer(KEY_A), {"authorization": f"bearer {KEY_A}"}, {"x-api-key": KEY_A}, {"x-api-key": KEY_C}],
)
async def test_a_configured_key_is_accepted_in_either_header(
    keyed: tuple[httpx.AsyncClient, list[TurnReport]], headers: dict[str, str]
) -> None:
    http, _ = keyed
    response = await http.post("/chat/s/stream", json={"message": "hi"}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.text == "echo: hi [turns=1]"
    assert (await http.get("/chat/s/messages", headers=headers)).status_code == 200
    created = await http.post("/sessions", headers=headers)
    assert created.status_code == 201


@pytest.mark.anyio
async def test_health_and_docs_stay_open(keyed: tuple[httpx.AsyncClient, list[TurnReport]]) -> None:
    http, _ = keyed
    assert (await http.get("/healthz")).status_code == 200
    assert (await http.get("/readyz")).status_code == 200
    assert (await http.get("/openapi.json")).status_code == 200
    metrics = await http.get("/metrics")
    assert metrics.status_code == 200 and "chat_requests_total" in metrics.text


def test_keys_cannot_see_each_others_sessions(live_app: StartApp) -> None:
    app = live_app(api_keys=KEYS)
    http = app.client
    assert (
        http.post("/chat/shared/stream", json={"message": "from a"}, headers=bearer(KEY_A)).status_code == 200
    )
    own = http.get("/chat/shared/messages", headers=bearer(KEY_A)).json()["messages"]
    assert [m["content"] for m in own] == ["from a", "echo: from a [turns=1]"]

    # To key B the session does not exist: reading and deleting are 404, and A's session survives.
    assert_error(http.get("/chat/shared/messages", headers=bearer(KEY_B)), 404, "not_found")
    assert_error(http.delete("/chat/shared", headers=bearer(KEY_B)), 404, "not_found")
    assert http.get("/chat/shared/messages", headers=bearer(KEY_A)).json()["messages"] == own

    # A turn on the same id starts B's own conversation, which A never sees.
    reply = http.post("/chat/shared/stream", json={"message": "from b"}, headers=bearer(KEY_B))
    assert reply.text == "echo: from b [turns=1]"
    theirs = http.get("/chat/shared/messages", headers={"x-api-key": KEY_B}).json()["messages"]
    assert [m["content"] for m in theirs] == ["from b", "echo: from b [turns=1]"]
    assert http.get("/chat/shared/messages", headers=bearer(KEY_A)).json()["messages"] == own
    assert http.post("/chat/shared/stream", json={"message": "again"}, headers=bearer(KEY_A)).text == (
        "echo: again [turns=2]"
    )

    # A session created by one key is the other's 404 too, and deleting one's own works.
    created = http.post("/sessions", headers=bearer(KEY_B)).json()["session_id"]
    assert_error(http.get(f"/chat/{created}/messages", headers=bearer(KEY_A)), 404, "not_found")
    assert http.delete("/chat/shared", headers=bearer(KEY_B)).status_code == 204
    assert http.get("/chat/shared/messages", headers=bearer(KEY_A)).json()["messages"][:2] == own


def test_a_revoked_key_is_refused_and_its_sessions_stay_its_own(live_app: StartApp) -> None:
    before = live_app(api_keys=f"{KEY_A},{KEY_B}")
    assert (
        before.client.post("/chat/kept/stream", json={"message": "hi"}, headers=bearer(KEY_B)).status_code
        == 200
    )
    # The deployment drops key B: the same Redis, new workers.
    after = live_app(api_keys=KEY_A)
    assert_error(
        after.client.post("/chat/kept/stream", json={"message": "hi"}, headers=bearer(KEY_B)),
        401,
        "authentication_error",
    )
    assert_error(after.client.get("/chat/kept/messages", headers=bearer(KEY_B)), 401, "authentication_error")
    assert_error(after.client.get("/chat/kept/messages", headers=bearer(KEY_A)), 404, "not_found")
    assert after.client.get("/chat/kept/messages").status_code == 401


def test_with_no_keys_the_api_is_open_and_shared(live_app: StartApp) -> None:
    app = live_app()
    assert app.client.post("/chat/open/stream", json={"message": "hi"}).status_code == 200
    # Any key sent to an open API is ignored: everybody shares the public sessions.
    assert len(app.client.get("/chat/open/messages", headers=bearer(KEY_A)).json()["messages"]) == 2


def test_client_addresses_trust_forwarded_for_only_from_trusted_proxies() -> None:
    auth = Authenticator([], ["10.0.0.0/8", "::1"])
    assert auth.identify(None, "203.0.113.7", "198.51.100.1").subject == "a.203.0.113.7"
    assert auth.identify(None, "10.1.2.3", "198.51.100.1").subject == "a.198.51.100.1"
    # A client can write anything left of the proxies' own entries; the nearest untrusted hop counts.
    assert auth.client_address("10.1.2.3", "1.1.1.1, 198.51.100.1, 10.9.9.9") == "198.51.100.1"
    assert auth.client_address("::1", "2001:db8::1") == "2001:db8::1"
    # Garbage in the header never becomes an identity: the last address vouched for is used.
    assert auth.client_address("10.1.2.3", "not-an-ip") == "10.1.2.3"
    assert auth.client_address("10.1.2.3", "198.51.100.1, bogus, 10.0.0.9") == "10.0.0.9"
    assert auth.client_address("10.1.2.3", "") == "10.1.2.3"
    assert auth.client_address(None, "198.51.100.1") == "unknown"
    # Sessions of an open API are public; only limits are per address.
    assert auth.identify(None, "10.1.2.3", None).tenant == "public"


def test_a_tenant_is_neither_the_key_nor_its_digest() -> None:
    auth = Authenticator(env_keys([KEY_A, f"sha256:{hashlib.sha256(KEY_C.encode()).hexdigest()}"]))
    a = auth.identify(KEY_A, "127.0.0.1", None)
    c = auth.identify(KEY_C, "127.0.0.1", None)
    assert a.tenant != c.tenant
    for key, caller in ((KEY_A, a), (KEY_C, c)):
        assert key not in caller.tenant
        assert caller.tenant not in hashlib.sha256(key.encode()).hexdigest()
        assert caller.subject == caller.tenant
    # Configuring a key by its digest gives it the same identity as configuring it in plain text.
    assert Authenticator(env_keys([KEY_C])).identify(KEY_C, None, None).tenant == c.tenant


@pytest.mark.parametrize(
    ("keys", "proxies"),
    [("short", ""), ("sha256:abc", ""), ("a key with spaces in it", ""), ("", "10.0.0.0/33"), ("", "proxy")],
)
def test_bad_keys_or_proxies_are_refused_at_start(
    make_settings: Callable[..., Settings], keys: str, proxies: str
) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        make_settings(api_keys=keys, trusted_proxies=proxies)


def test_settings_never_show_a_key(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(api_keys=KEYS)
    assert KEY_A not in repr(settings) and KEY_A not in str(settings.model_dump())
