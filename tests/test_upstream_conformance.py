"""The upstream client against HTTP servers not written here: uvicorn serving a fake of the Messages
API, nginx (plain and TLS) in front of the stand-in model, and proxy.py as an HTTP and a CONNECT proxy.

Only the malformed responses come from a server of the test's own, since no well-behaved server
sends them. TLS uses a test CA made here with trustme, handed over in `SSL_CERT_FILE` as the SDK's own
client reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
import trustme

from api.config import Settings
from api.dev.standin import StandInModel
from api.errors import ChatError, UpstreamFailed
from api.upstream.client import ReplyBroken, Upstream, UpstreamRequest
from api.upstream.transport import LeanTransport
from tests.conftest import LiveApp
from tests.processes import Nginx, ThreadServer, free_port, nginx_binary, stop_process, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

TEXTS = [b"Hello", b", ", b"world", b"!"]
TRANSPORTS = ["lean", "httpx"]


def events(texts: list[bytes]) -> list[bytes]:
    """A reply as the Messages API streams it, one event per item."""

    def event(name: str, data: dict[str, Any]) -> bytes:
        return b"event: %b\ndata: %b\n\n" % (name.encode(), orjson.dumps({"type": name, **data}))

    message = {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "m"}
    return [
        event("message_start", {"message": {**message, "usage": {"input_tokens": 1, "output_tokens": 1}}}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        *(
            event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": t.decode()}})
            for t in texts
        ),
        event("content_block_stop", {"index": 0}),
        event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}}),
        event("message_stop", {}),
    ]


class FakeClaude:
    """An ASGI fake of the Messages API. The first path segment picks the framing: `chunked` (no
    length, so uvicorn chunks it), `length` (one body with its Content-Length), `close` (a length,
    then `connection: close`) or `gzip` (a length, and a `content-encoding` no client asked for).
    It records each request's client port, one per connection."""

    def __init__(self, gap: float = 0.0) -> None:
        self.gap = gap
        self.client_ports: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body"):
            pass
        self.client_ports.append(scope["client"][1])
        mode = scope["path"].split("/")[1]
        body = events(TEXTS)
        headers = [(b"content-type", b"text/event-stream"), (b"Request-Id", b"req_fake")]
        if mode == "chunked":
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for part in body:
                await send({"type": "http.response.body", "body": part, "more_body": True})
                await asyncio.sleep(self.gap)
            await send({"type": "http.response.body", "body": b""})
            return
        whole = b"".join(body)
        headers.append((b"content-length", b"%d" % len(whole)))
        if mode == "close":
            headers.append((b"connection", b"close"))
        if mode == "gzip":
            headers.append((b"Content-Encoding", b"GZIP"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": whole})


def settings(base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "anthropic_api_key": "test-key",
        "anthropic_base_url": base_url,
        "upstream_max_retries": 0,
        "upstream_timeout_seconds": 5.0,
    }
    return Settings(**{**values, **overrides})


@contextlib.asynccontextmanager
async def upstream(base_url: str, **overrides: Any) -> AsyncIterator[Upstream]:
    client = Upstream(settings(base_url, **overrides))
    try:
        yield client
    finally:
        await client.aclose()


async def turn(client: Upstream, message: str = "hi") -> bytes:
    request = UpstreamRequest(model="m", max_tokens=16, messages=[{"role": "user", "content": message}])
    reply = await client.open(request)
    try:
        return b"".join([text async for text in reply.chunks()])
    finally:
        await reply.close()


@pytest.fixture
def fake() -> Iterator[tuple[FakeClaude, ThreadServer]]:
    app = FakeClaude()
    with ThreadServer(app, http="httptools") as server:
        yield app, server


# --- uvicorn serving a fake ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_chunked_and_content_length_bodies_arrive_whole(
    fake: tuple[FakeClaude, ThreadServer], framing: str, transport: str
) -> None:
    _, server = fake
    async with upstream(f"{server.url}/{framing}", upstream_transport=transport) as client:
        assert await turn(client) == b"".join(TEXTS)


async def test_the_direct_request_takes_the_request_id_and_refuses_a_body_it_cannot_read(
    fake: tuple[FakeClaude, ThreadServer],
) -> None:
    _, server = fake
    request = UpstreamRequest(model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    async with upstream(f"{server.url}/length") as client:
        assert client.direct is not None
        reply = await client.open(request)
        await reply.close()
        assert reply.request_id == "req_fake"  # header names are matched whatever their case
    async with upstream(f"{server.url}/gzip") as client:
        with pytest.raises(ChatError) as raised:
            await turn(client)
        assert raised.value.status == 502


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_keep_alive_reuses_one_connection(
    fake: tuple[FakeClaude, ThreadServer], transport: str
) -> None:
    app, server = fake
    async with upstream(f"{server.url}/length", upstream_transport=transport) as client:
        for _ in range(3):
            assert await turn(client) == b"".join(TEXTS)
    assert len(app.client_ports) == 3 and len(set(app.client_ports)) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_server_that_closes_after_each_response_gets_a_new_connection_each_time(
    fake: tuple[FakeClaude, ThreadServer], transport: str
) -> None:
    app, server = fake
    async with upstream(f"{server.url}/close", upstream_transport=transport) as client:
        for _ in range(3):
            assert await turn(client) == b"".join(TEXTS)
    assert len(set(app.client_ports)) == 3


async def test_idle_connections_are_reclaimed_after_a_burst() -> None:
    app = FakeClaude(gap=0.02)  # replies overlap, so the burst opens a connection each
    limits = httpx2.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=0.5)
    lean = LeanTransport(limits=limits)
    with ThreadServer(app, http="httptools") as server:
        sdk = anthropic.AsyncAnthropic(
            base_url=f"{server.url}/chunked",
            api_key="test-key",
            max_retries=0,
            http_client=anthropic.DefaultAsyncHttpxClient(transport=lean),
        )
        try:

            async def one() -> None:
                stream = await sdk.messages.create(
                    model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}], stream=True
                )
                async for _ in stream:
                    pass

            await asyncio.gather(*(one() for _ in range(20)))
            assert lean.idle_connections > 1  # the burst left connections in the pool
            open_at_server = server.server.server_state.connections
            assert len(open_at_server) > 1
            # No request comes after the burst: the pool itself closes what expired.
            for _ in range(300):
                if lean.idle_connections == 0 and not open_at_server:
                    break
                await asyncio.sleep(0.01)
            assert lean.idle_connections == 0
            assert not open_at_server, "the server still holds the burst's connections"
        finally:
            await sdk.close()


# --- malformed framing (no real server sends it) ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_server(response: bytes) -> AsyncIterator[str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            await reader.readexactly(length)
            writer.write(response)
            await writer.drain()
            await reader.read()  # held open: a client that waits for more would hang here
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"


@pytest.mark.parametrize("length", [b"-5", b"+5", b"0x10", b"1_0", b"ten"])
async def test_a_malformed_content_length_is_a_502_not_a_crash_or_a_hang(length: bytes) -> None:
    response = SSE_HEAD + b"content-length: %b\r\n\r\n" % length + b"".join(events(TEXTS))
    async with raw_server(response) as url, upstream(url) as client:
        with pytest.raises(UpstreamFailed) as failed:
            await turn(client)
    assert failed.value.status == 502
    assert failed.value.upstream_error == "connection"


@pytest.mark.parametrize("size", [b"-5", b"+5", b"0x5", b"1_0", b"zz"])
async def test_a_malformed_chunk_size_mid_reply_breaks_the_reply_cleanly(size: bytes) -> None:
    first = b"".join(events(TEXTS)[:3])
    body = b"%x\r\n%b\r\n" % (len(first), first) + size + b"\r\nhello\r\n0\r\n\r\n"
    response = SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n" + body
    async with raw_server(response) as url, upstream(url) as client:
        request = UpstreamRequest(model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
        reply = await client.open(request)
        try:
            assert await reply.next_text() == TEXTS[0]
            with pytest.raises(ReplyBroken) as broken:
                await reply.next_text()
        finally:
            await reply.close()
    assert broken.value.kind == "connection"


# --- nginx in front of the stand-in, plain and TLS -----------------------------------------------------------


class Certificates:
    def __init__(self, root: Path) -> None:
        ca = trustme.CA()
        server = ca.issue_cert("localhost", "127.0.0.1")
        self.ca = root / "ca.pem"
        self.other_ca = root / "other-ca.pem"
        self.chain = root / "server-chain.pem"
        self.key = root / "server-key.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        trustme.CA().cert_pem.write_to_path(str(self.other_ca))
        server.private_key_pem.write_to_path(str(self.key))
        for i, blob in enumerate(server.cert_chain_pems):
            blob.write_to_path(str(self.chain), append=i > 0)


class Front:
    """nginx proxying to the stand-in on a plain and a TLS port."""

    def __init__(self, nginx: Nginx, tls_port: int, certificates: Certificates) -> None:
        self.nginx = nginx
        self.http = nginx.url
        self.https = f"https://localhost:{tls_port}"
        self.certificates = certificates


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, standin: StandInModel) -> Iterator[Front]:
    binary = nginx_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is required in CI (.ci/run installs nginx-light)")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    root = tmp_path_factory.mktemp("front")
    certificates = Certificates(root)
    port, tls_port = free_port(), free_port()
    conf = f"""
events {{ worker_connections 256; }}
error_log {root}/error.log warn;
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    upstream model {{ server {standin.url.removeprefix("http://")}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {certificates.chain};
        ssl_certificate_key {certificates.key};
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
    nginx = Nginx(binary, conf, port, root / "nginx")
    try:
        nginx.start()
        yield Front(nginx, tls_port, certificates)
    finally:
        nginx.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


REPLY = b"w0 w1 w2 w3 w4 "  # what the stand-in answers to @@deltas=5


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_reply_through_nginx_arrives_whole(front: Front, clean_env: Any, transport: str) -> None:
    async with upstream(front.http, upstream_transport=transport) as client:
        for _ in range(2):
            assert await turn(client, "@@deltas=5") == REPLY


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tls_with_a_test_ca_given_in_ssl_cert_file(
    front: Front, clean_env: pytest.MonkeyPatch, transport: str
) -> None:
    clean_env.setenv("SSL_CERT_FILE", str(front.certificates.ca))
    async with upstream(front.https, upstream_transport=transport) as client:
        assert await turn(client, "@@deltas=5") == REPLY


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_certificate_from_an_untrusted_ca_is_refused_at_once_with_a_502(
    front: Front, clean_env: pytest.MonkeyPatch, live_app: Callable[..., LiveApp], transport: str
) -> None:
    clean_env.setenv("SSL_CERT_FILE", str(front.certificates.other_ca))
    # The default retries stay on: a certificate that did not verify is not worth their backoff.
    app = live_app(anthropic_base_url=front.https, upstream_transport=transport, upstream_max_retries=2)
    response = app.client.post("/chat/stream", json={"message": "hi"}, timeout=1.0)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "upstream_error" and "certificate" in error["message"], error


# --- proxies -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """proxy.py on loopback: a forward proxy for http:// and a CONNECT tunnel for https://."""
    port = free_port()
    log = tmp_path_factory.mktemp("proxy") / "proxy.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "--hostname",
                "127.0.0.1",
                "--port",
                str(port),
                "--num-acceptors",
                "1",
                "--num-workers",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"proxy.py exited: {log.read_text()[-2000:]}")
            with socket.create_connection(("127.0.0.1", port), 1):
                return True

        wait_until(listening, 15, "proxy.py")
        yield f"http://127.0.0.1:{port}", log
    finally:
        stop_process(proc)


async def test_http_proxy_from_http_proxy(
    front: Front, proxy: tuple[str, Path], clean_env: pytest.MonkeyPatch
) -> None:
    url, log = proxy
    clean_env.setenv("HTTP_PROXY", url)
    async with upstream(front.http) as client:
        assert await turn(client, "@@deltas=5") == REPLY
    target = front.http.removeprefix("http://")
    wait_until(lambda: f"POST {target}/v1/messages" in log.read_text(), 5, "the proxy's access log")


async def test_https_through_a_connect_proxy_from_https_proxy(
    front: Front, proxy: tuple[str, Path], clean_env: pytest.MonkeyPatch
) -> None:
    url, log = proxy
    clean_env.setenv("HTTPS_PROXY", url)
    clean_env.setenv("SSL_CERT_FILE", str(front.certificates.ca))
    async with upstream(front.https) as client:
        assert await turn(client, "@@deltas=5") == REPLY
    target = front.https.removeprefix("https://")
    wait_until(lambda: f"CONNECT {target}" in log.read_text(), 5, "the proxy's access log")


async def test_the_transport_honours_httpx_s_tls_and_pool_options(front: Front, clean_env: Any) -> None:
    """`verify` and `limits`, which an httpx client given a `transport=` would ignore, reach the pool."""
    url = f"{front.https}/v1/messages"
    # Slow enough that the three requests overlap, each on a connection of its own.
    message = {"role": "user", "content": "@@deltas=3 @@delay=0.05"}
    body = {"model": "m", "max_tokens": 16, "stream": True, "messages": [message]}
    headers = {"authorization": "Bearer test-key", "anthropic-version": "2023-06-01"}
    trusting = ssl.create_default_context(cafile=str(front.certificates.ca))
    limits = httpx2.Limits(max_connections=10, max_keepalive_connections=1)
    lean = LeanTransport(verify=trusting, limits=limits)
    async with httpx2.AsyncClient(transport=lean) as client:
        responses = await asyncio.gather(*(client.post(url, json=body, headers=headers) for _ in range(3)))
        assert all(r.status_code == 200 and b"message_stop" in r.content for r in responses)
        assert lean.idle_connections == 1  # the two past max_keepalive_connections were closed
    async with httpx2.AsyncClient(transport=LeanTransport()) as client:  # the system's CAs only
        with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.post(url, json=body, headers=headers)
