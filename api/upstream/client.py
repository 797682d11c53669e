"""Claude, through the official SDK: it builds, authenticates and retries the request; we read the reply.

The SDK's retries cover everything up to the response headers, which is exactly the window in which a
retry is safe. Once the 200 arrives, the body is read as raw bytes and decoded by `ReplyDecoder`,
because parsing every event into typed objects is most of a relay's cost per token.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import anthropic
import httpx2
from opentelemetry import trace

from api.config import Settings
from api.errors import ChatError, UpstreamFailed, UpstreamTimeout, UpstreamUnavailable
from api.upstream.caching import prompt
from api.upstream.direct import BadCertificate, DirectUpstream, Refused, Unreachable, certificate_failure
from api.upstream.events import ReplyDecoder, UpstreamEventError
from api.upstream.transport import BODY, BodyStream, LeanTransport

DEFAULT_RETRY_AFTER = 5.0


@dataclass(slots=True)
class UpstreamRequest:
    model: str
    max_tokens: int
    messages: list[dict[str, str]]
    system: str | None = None
    temperature: float | None = None


# What can go wrong with Claude, as counted by the `chat_upstream_errors_total` metric.
UPSTREAM_ERRORS = (
    "rate_limited",  # 429, after retries
    "overloaded",  # 503 or 529 after retries, or an overloaded_error event
    "timeout",  # no answer, no first token, or a silence mid-reply, within the timeout
    "connection",  # could not connect, or the connection dropped
    "refused",  # any other 4xx: Claude will not take this request
    "server_error",  # any other 5xx, after retries
    "error_event",  # an `error` event other than overloaded_error
    "incomplete",  # the reply ended without message_stop, or had no text
)


class ReplyBroken(Exception):
    """The reply stopped before `message_stop`; `kind` (one of `UPSTREAM_ERRORS`) tells how."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind

    @property
    def overloaded(self) -> bool:
        return self.kind == "overloaded"

    @property
    def timeout(self) -> bool:
        return self.kind == "timeout"


class Reply:
    """One open reply stream: pull its text with `next_text()`, or have it pushed with `pipe()`.
    Always `close()` it."""

    __slots__ = ("_on_end", "_on_text", "_read", "_response", "_stream", "decoder", "request_id")

    def __init__(
        self,
        response: anthropic.AsyncAPIResponse[Any] | None,
        stream: BodyStream | None = None,
        request_id: str | None = None,
    ) -> None:
        self.decoder = ReplyDecoder()
        self.request_id: str | None = request_id if response is None else response.request_id
        # On the lean transport only its body stream is kept: the SDK's request and response objects
        # (the request's options, a copy of its messages, both sets of headers) are a good part of
        # what an open stream would otherwise hold in memory.
        if response is not None:
            stream = response.http_response.extensions.get(BODY)
        self._stream: BodyStream | None = stream
        self._response = None if stream is not None else response
        self._read = self._reader(response)
        self._on_text: Callable[[bytes], None] | None = None
        self._on_end: Callable[[ReplyBroken | None], None] | None = None

    async def next_text(self) -> bytes:
        """The next text as it arrives (several deltas that arrive in one read come as one), or b""
        once the reply completed.

        Raises `ReplyBroken` for an `error` event, a dropped or stalled connection, or an end without
        `message_stop`: text already returned stays returned, so only the caller knows what to undo.
        """
        decoder = self.decoder
        try:
            decoder.check()  # an error that came in one read after text that was returned first
            # Reading on to the end of the body (not stopping at message_stop) hands the
            # connection back to the pool for the next turn instead of closing it.
            while raw := await self._read():
                if decoder.done:
                    continue
                text = decoder.feed(raw)
                if text:
                    return text
        except (UpstreamEventError, httpx2.HTTPError) as exc:
            broken = _broken(exc, decoder.done)
            if broken is not None:
                raise broken from exc
        if not decoder.done:
            raise ReplyBroken("the upstream ended the reply without message_stop", "incomplete")
        return b""

    async def chunks(self) -> AsyncIterator[bytes]:
        """The rest of the text, pulled."""
        while text := await self.next_text():
            yield text

    def pipe(self, on_text: Callable[[bytes], None], on_end: Callable[[ReplyBroken | None], None]) -> bool:
        """Push the rest of the text to `on_text` as it arrives, from the connection's own callback,
        then call `on_end` once: None when the reply completed, else how it broke. False (and nothing
        done) where the body is not on the lean transport and can only be pulled."""
        if self._stream is None:
            return False
        self._on_text, self._on_end = on_text, on_end
        if self.decoder.error is not None:
            self._end(_broken(self.decoder.error, False))
        else:
            self._stream.body.pipe(self)
        return True

    def throttle(self, paused: bool) -> None:
        """Hold back (or resume) a piped reply while whoever it is pushed to cannot keep up."""
        if self._stream is not None:
            self._stream.body.throttle(paused)

    # BodySink: the lean transport's callbacks while piped

    def body_data(self, data: bytes) -> None:
        decoder = self.decoder
        if decoder.done or self._on_text is None:
            return  # the rest of the body after message_stop: read to its end, for the pool
        try:
            text = decoder.feed(data)
            if text:
                self._on_text(text)
                decoder.check()
        except UpstreamEventError as exc:
            self._end(_broken(exc, False))

    def body_end(self, error: Exception | None) -> None:
        if self.decoder.done:
            self._end(None)
        elif error is None:
            self._end(ReplyBroken("the upstream ended the reply without message_stop", "incomplete"))
        else:
            self._end(_broken(error, False))

    def _end(self, broken: ReplyBroken | None) -> None:
        on_end = self._on_end
        self._on_text = self._on_end = None
        if self._stream is not None:
            self._stream.body.unpipe()
        if on_end is not None:
            on_end(broken)

    def _reader(self, response: anthropic.AsyncAPIResponse[Any] | None) -> Callable[[], Awaitable[bytes]]:
        """The next bytes of the body (b"" at its end): the lean transport's read, straight; any other
        transport's (an egress proxy's) through httpx's iterator."""
        if self._stream is not None:
            return self._stream.body.read
        assert response is not None
        raw = response.http_response.aiter_bytes()
        return lambda: anext(raw, b"")

    async def close(self) -> None:
        self._on_text = self._on_end = None
        if self._stream is not None:
            self._stream.body.unpipe()
            self._stream.close()
        elif self._response is not None:
            await self._response.close()


def _broken(exc: Exception, done: bool) -> ReplyBroken | None:
    """How a reply broke, from what its reading raised; None for a failure after message_stop, which
    cost nothing but the connection's reuse."""
    if isinstance(exc, UpstreamEventError):
        kind = "overloaded" if exc.error_type == "overloaded_error" else "error_event"
        return ReplyBroken(str(exc), kind)
    if done:
        return None
    if isinstance(exc, httpx2.TimeoutException):
        return ReplyBroken("the upstream stalled", "timeout")
    return ReplyBroken(f"the upstream connection failed: {type(exc).__name__}", "connection")


_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


def http_client(
    max_connections: int, transport: Literal["lean", "httpx"] = "lean"
) -> tuple[httpx2.AsyncClient, LeanTransport | None]:
    """The SDK's client on the lean transport (returned too), or on httpx's own when asked to or when
    an egress proxy is configured (the lean transport speaks only direct HTTP/1.1)."""
    limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    if transport == "httpx" or any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return anthropic.DefaultAsyncHttpxClient(limits=limits), None
    lean = LeanTransport(limits=limits)
    return anthropic.DefaultAsyncHttpxClient(transport=lean), lean


def sdk_tracing() -> Literal[False] | None:
    """The SDK's OpenTelemetry spans where OpenTelemetry is set up, else off.

    With no tracer provider the SDK still builds every call's span attributes for a no-op span: about
    a twentieth of a turn's CPU. So its spans stay on (None: the SDK decides, from its own
    `ANTHROPIC_OPEN_TELEMETRY*` variables) when a provider is registered or the environment speaks
    of OpenTelemetry (`OTEL_*`, as `opentelemetry-instrument` and the SDK's exporters read it).
    """
    if any(name.startswith(("OTEL_", "ANTHROPIC_OPEN_TELEMETRY")) for name in os.environ):
        return None
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None
    return False


class CertificateRejected(Exception):
    """The upstream's TLS certificate did not verify: no retry can change that."""


async def _no_retry_on_bad_certificate(
    request: anthropic.APIRequest, call_next: anthropic.AsyncCallNext
) -> anthropic.AsyncAPIResponse[Any]:
    """SDK middleware: a certificate that did not verify fails the request at once, where the SDK would
    retry it as any connection failure (seconds of backoff for a refusal that cannot change). The
    SDK retries only its own connection errors, so this one, raised by middleware, is not retried."""
    try:
        return await call_next(request)
    except anthropic.APIConnectionError as exc:
        reason = certificate_failure(exc)
        if reason is None:
            raise
    raise CertificateRejected(reason)


class Upstream:
    def __init__(self, settings: Settings) -> None:
        http, lean = http_client(settings.upstream_max_connections, settings.upstream_transport)
        tracing = sdk_tracing()
        self.client = anthropic.AsyncAnthropic(
            api_key=settings.api_key,
            base_url=settings.anthropic_base_url,
            max_retries=settings.upstream_max_retries,
            timeout=httpx2.Timeout(settings.upstream_timeout_seconds, connect=5.0),
            http_client=http,
            open_telemetry=tracing,
            middleware=[_no_retry_on_bad_certificate],
        )
        self.prompt_cache = settings.prompt_cache == "auto"
        # The direct path, where the SDK's request is all static: on the lean transport, without the
        # SDK's spans (an embedder who traces keeps them) and unless the SDK's own path is asked for.
        self.direct: DirectUpstream | None = None
        if lean is not None and tracing is False and settings.upstream_client == "direct":
            try:
                self.direct = DirectUpstream(self.client, lean)
            except ValueError:
                self.direct = None

    async def open(self, request: UpstreamRequest) -> Reply:
        """Send the request (with the SDK's retries) and return the reply once its headers arrived."""
        if self.direct is not None:
            return await self._open_direct(request)
        params: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            **prompt(request.messages, request.system, cache=self.prompt_cache),
            "stream": True,
            # The SDK asks for gzip; a compressed stream would have to go through httpx's decoders
            # instead of being read straight off the lean transport. Text deltas compress little.
            "extra_headers": {"accept-encoding": "identity"},
        }
        if request.temperature is not None:
            # The SDK's `create` no longer names it; the Messages API still takes it in the body.
            params["extra_body"] = {"temperature": request.temperature}
        try:
            response = await self.client.messages.with_streaming_response.create(**params).__aenter__()
        except anthropic.APIError as exc:
            raise open_error(exc) from exc
        except CertificateRejected as exc:
            raise UpstreamFailed(
                f"Claude's TLS certificate was not trusted: {exc}", upstream_error="connection"
            ) from exc
        return Reply(response)

    async def _open_direct(self, request: UpstreamRequest) -> Reply:
        assert self.direct is not None
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            **prompt(request.messages, request.system, cache=self.prompt_cache),
            "stream": True,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        try:
            stream, request_id = await self.direct.open(body)
        except Refused as exc:
            raise status_error(exc.status, exc.headers.get("retry-after"), exc.message) from exc
        except Unreachable as exc:
            if exc.timeout:
                raise UpstreamTimeout("Claude did not answer in time", upstream_error="timeout") from exc
            raise UpstreamFailed("Claude could not be reached", upstream_error="connection") from exc
        except BadCertificate as exc:
            raise UpstreamFailed(
                f"Claude's TLS certificate was not trusted: {exc}", upstream_error="connection"
            ) from exc
        return Reply(None, stream, request_id)

    async def aclose(self) -> None:
        await self.client.close()


def open_error(exc: anthropic.APIError) -> ChatError:
    """Map what the SDK raised (after its retries) to the status our client gets."""
    if isinstance(exc, anthropic.APITimeoutError):
        return UpstreamTimeout("Claude did not answer in time", upstream_error="timeout")
    if isinstance(exc, anthropic.APIConnectionError):
        return UpstreamFailed("Claude could not be reached", upstream_error="connection")
    if isinstance(exc, anthropic.APIStatusError):
        return status_error(exc.status_code, exc.response.headers.get("retry-after"), _api_message(exc))
    return UpstreamFailed("Claude failed", upstream_error="server_error")


def status_error(status: int, retry_after: str | None, message: str) -> ChatError:
    """What our client gets for an error status from Claude, after the retries it allows."""
    if status in (429, 503, 529):
        what = "rate-limited" if status == 429 else "overloaded"
        return UpstreamUnavailable(
            f"Claude is {what}; try again later",
            retry_after=_retry_after(retry_after),
            upstream_error="rate_limited" if status == 429 else "overloaded",
        )
    if status == 504:
        return UpstreamTimeout("Claude did not answer in time", upstream_error="timeout")
    return UpstreamFailed(
        f"Claude refused the request ({status}): {message}",
        upstream_error="server_error" if status >= 500 else "refused",
    )


def _api_message(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:300]
    return exc.message[:300]


def _retry_after(value: str | None) -> float:
    try:
        seconds = float(value) if value is not None else DEFAULT_RETRY_AFTER
    except ValueError:
        seconds = DEFAULT_RETRY_AFTER
    return max(1.0, min(seconds, 3600.0))
