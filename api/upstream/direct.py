"""The Messages API request, sent straight onto the lean transport's pool: the SDK's identity, its
retry policy and its timeouts, without rebuilding them for every request.

The SDK makes a request anew each time: its options model copied, every header merged and validated
through `httpx2.Headers`, the URL parsed and joined, an `httpx2.Request` and `Response` built around a
body the relay then reads straight off the socket anyway. That is most of a short turn's CPU (see
docs/hand-written-parts.md). Here everything that does not change between requests, the SDK's own
headers included, is made once; a request is its JSON body, a content length and a retry count.

What it takes from the SDK, unchanged: the base URL, the headers (`default_headers`: auth, API version,
user agent and platform, `ANTHROPIC_CUSTOM_HEADERS`), the retry policy (statuses, `x-should-retry`,
`retry-after`, the backoff) and the timeouts. It is used only where those are static: a client that
authenticates per request (credential profiles), a proxy or a non-lean transport keep the SDK's own path.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import ssl
import time
from collections.abc import Mapping
from typing import Any

import anthropic
import httpx2
import orjson

from api.upstream.transport import BodyStream, LeanTransport

# The SDK's backoff (anthropic._constants): 0.5 s doubling up to 8 s, less up to a quarter at random.
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 4_294_967.0  # the SDK's own bound on a server-given wait
_ERROR_BODY_LIMIT = 64 * 1024


class Refused(Exception):
    """Claude answered with an error status, after the retries that status allows."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        super().__init__(f"status {status}")
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def message(self) -> str:
        try:
            error = orjson.loads(self.body).get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                return str(error["message"])[:300]
        except (orjson.JSONDecodeError, AttributeError):
            pass
        return self.body[:300].decode("utf-8", "replace") or f"status {self.status}"


class Unreachable(Exception):
    """No response came, after the retries: `timeout` when it was a connect, pool or read timeout."""

    def __init__(self, cause: Exception, timeout: bool) -> None:
        super().__init__(str(cause))
        self.timeout = timeout


class BadCertificate(Exception):
    """The upstream's TLS certificate did not verify: no retry can change that."""


def _static_headers(client: anthropic.AsyncAnthropic) -> dict[str, str] | None:
    """The headers the SDK sends with every request, or None where they are not all known up front."""
    headers = {
        name.lower(): value for name, value in client.default_headers.items() if isinstance(value, str)
    }
    if "authorization" not in headers and "x-api-key" not in headers:
        return None  # authenticated per request (a credential profile): only the SDK can
    timeout = client.timeout
    read = timeout.read if isinstance(timeout, httpx2.Timeout) else timeout
    headers["x-stainless-timeout"] = str(read)
    if read is not None:
        headers["x-stainless-read-timeout"] = str(read)
    # The relay reads the body as sent: a compressed stream would need decoding, for little gain.
    headers["accept-encoding"] = "identity"
    for name in ("content-length", "transfer-encoding", "host", "connection"):
        headers.pop(name, None)
    return headers


class DirectUpstream:
    """POST /v1/messages with `stream: true`, retried as the SDK retries it, on the lean transport."""

    def __init__(self, client: anthropic.AsyncAnthropic, transport: LeanTransport) -> None:
        headers = _static_headers(client)
        if headers is None:
            raise ValueError("the SDK's headers are not static")
        url = httpx2.URL(str(client.base_url))
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        port = url.port or (443 if scheme == "https" else 80)
        self._key = (scheme, url.host, port)
        host = url.netloc.decode("ascii")
        path = url.raw_path.rstrip(b"/") + b"/v1/messages"
        lines = [b"POST " + path + b" HTTP/1.1", b"host: " + host.encode("ascii")]
        lines += [name.encode("latin-1") + b": " + value.encode("latin-1") for name, value in headers.items()]
        self._head = b"\r\n".join(lines) + b"\r\n"
        self._transport = transport
        self._max_retries = client.max_retries
        self._timeouts = httpx2.Timeout(client.timeout).as_dict()  # what httpx hands its transport

    async def open(self, body: dict[str, Any]) -> tuple[BodyStream, str | None]:
        """Send the request, retrying what the SDK would retry, and return the body of the 200 and its
        request id. Raises `Refused`, `Unreachable` or `BadCertificate`."""
        payload = orjson.dumps(body)
        for retries in range(self._max_retries + 1):
            last = retries == self._max_retries
            head = self._head + b"x-stainless-retry-count: %d\r\ncontent-length: %d\r\n\r\n" % (
                retries,
                len(payload),
            )
            try:
                status, _, raw, stream = await self._transport.send(self._key, head, payload, self._timeouts)
            except httpx2.TransportError as exc:
                reason = certificate_failure(exc)
                if reason is not None:
                    raise BadCertificate(reason) from exc
                if last:
                    raise Unreachable(exc, isinstance(exc, httpx2.TimeoutException)) from exc
                await asyncio.sleep(_backoff(retries, None))
                continue
            if status == 200:
                # Of a reply's headers only these two matter, on every turn: no dict of them all.
                request_id, encoding = None, "identity"
                for name, value in raw:
                    lowered = name.lower()
                    if lowered == b"request-id":
                        request_id = value.decode("latin-1")
                    elif lowered == b"content-encoding":
                        encoding = value.decode("latin-1").lower()
                if encoding != "identity":
                    stream.close()
                    raise Unreachable(httpx2.DecodingError(f"unexpected {encoding} body"), False)
                return stream, request_id
            headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}
            error_body = await _read_error_body(stream)
            if last or not _should_retry(status, headers):
                raise Refused(status, headers, error_body)
            await asyncio.sleep(_backoff(retries, headers))
        raise AssertionError("unreachable")  # the last attempt returns or raises


async def _read_error_body(stream: BodyStream) -> bytes:
    data = bytearray()
    try:
        while chunk := await stream.body.read():
            if len(data) < _ERROR_BODY_LIMIT:
                data += chunk
    except httpx2.HTTPError:
        pass  # the status is what matters; the message is a courtesy
    finally:
        stream.close()
    return bytes(data[:_ERROR_BODY_LIMIT])


def _should_retry(status: int, headers: Mapping[str, str]) -> bool:
    """The SDK's rule (`_should_retry`): the server's `x-should-retry` first, then the status."""
    explicit = headers.get("x-should-retry")
    if explicit == "true":
        return True
    if explicit == "false":
        return False
    return status in (408, 409, 429) or status >= 500


def _backoff(retries: int, headers: Mapping[str, str] | None) -> float:
    """The SDK's wait before a retry (`_calculate_retry_timeout`): what the server asked, else backoff."""
    after = _retry_after(headers) if headers is not None else None
    if after is not None and after > 0:
        return min(after, MAX_RETRY_AFTER)
    return backoff(retries)


def backoff(retries: int) -> float:
    """The SDK's own backoff before retry number `retries` + 1: 0.5 s doubling up to 8 s, less up to a
    quarter at random."""
    return min(INITIAL_RETRY_DELAY * 2.0 ** min(retries, 1000), MAX_RETRY_DELAY) * (
        1 - 0.25 * random.random()
    )


def _retry_after(headers: Mapping[str, str]) -> float | None:
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return float(milliseconds) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return float(email.utils.mktime_tz(parsed) - time.time())


def certificate_failure(error: BaseException) -> str | None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current.verify_message or str(current)
        current = current.__cause__ or current.__context__
    return None
