"""The service's errors and the one table that turns them into HTTP.

ChatError                       a turn (or request) refused before any reply byte was sent
├── InvalidRequest        400   empty message, bad session id, unknown model, nothing to regenerate
├── AuthenticationFailed  401
├── NotFound              404
├── SessionBusy           409   another turn of the session is in flight, on any worker
├── RequestTooLarge       413
├── UnsupportedMediaType  415   a chat POST whose body is not declared application/json
├── ValidationFailed      422   body is not JSON or has fields of the wrong type
├── IdempotencyMismatch   422   an Idempotency-Key sent again with another body
├── RateLimited           429
├── UpstreamFailed        502   Claude refused the request or failed, after retries
├── Unavailable           503   Redis unreachable, Claude overloaded, worker full or draining
└── UpstreamTimeout       504   no first token in time

StreamFailed                    the reply broke after the 200 went out: a text reply is cut short,
                                an event stream ends with an `error` event
StreamAborted                   raised to the server so that it drops the connection without the final chunk
"""

from __future__ import annotations

from typing import ClassVar

import orjson

from api.outcomes import Outcome


class ChatError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    outcome: ClassVar[Outcome] = Outcome.REJECTED

    def __init__(
        self, message: str, *, retry_after: float | None = None, upstream_error: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        # When Claude caused it: what went wrong, in a few words fit for a metric label (`UPSTREAM_ERRORS`).
        self.upstream_error = upstream_error

    def body(self) -> bytes:
        return error_body(self.type, self.message)


class InvalidRequest(ChatError):
    status = 400
    type = "invalid_request"


class AuthenticationFailed(ChatError):
    status = 401
    type = "authentication_error"


class NotFound(ChatError):
    status = 404
    type = "not_found"


class SessionBusy(ChatError):
    status = 409
    type = "session_busy"


class RequestTooLarge(ChatError):
    status = 413
    type = "request_too_large"


class UnsupportedMediaType(ChatError):
    status = 415
    type = "unsupported_media_type"


class ValidationFailed(ChatError):
    status = 422
    type = "validation_error"


class IdempotencyMismatch(ChatError):
    status = 422
    type = "idempotency_mismatch"


class RateLimited(ChatError):
    status = 429
    type = "rate_limited"


class UpstreamFailed(ChatError):
    status = 502
    type = "upstream_error"
    outcome = Outcome.UPSTREAM_ERROR


class Unavailable(ChatError):
    status = 503
    type = "unavailable"


class UpstreamUnavailable(Unavailable):
    """Claude is overloaded or rate-limits us: the client should come back later, like any 503."""

    outcome = Outcome.UPSTREAM_ERROR


class StoreUnavailable(Unavailable):
    outcome = Outcome.UNKNOWN_ERROR


class UpstreamTimeout(ChatError):
    status = 504
    type = "upstream_timeout"
    outcome = Outcome.UPSTREAM_ERROR


class StreamFailed(Exception):
    """The reply cannot be completed once streaming began; `outcome` says whose fault it was."""

    def __init__(
        self, reason: str, outcome: Outcome = Outcome.UPSTREAM_ERROR, error_type: str = "upstream_error"
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcome = outcome
        # The error type the HTTP status would have carried, for a stream that can still say so (SSE).
        self.error_type = error_type


class StreamAborted(Exception):
    """Raised to the server so it drops the connection without the final chunk."""


def error_body(type_: str, message: str) -> bytes:
    return orjson.dumps({"error": {"type": type_, "message": message}})
