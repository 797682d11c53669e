"""The `Idempotency-Key` header of chat POSTs (IETF httpapi draft), and the header of a replayed reply."""

from __future__ import annotations

from starlette.requests import Request

from api.errors import InvalidRequest

REPLAYED = (b"idempotent-replayed", b"true")
MAX_KEY = 255


def idempotency_key(request: Request) -> str | None:
    """The request's `Idempotency-Key`: 1-255 printable ASCII characters, as a structured-field
    string (quoted) or bare; None when absent. Anything else is a 400."""
    raw = request.headers.get("idempotency-key")
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if not 1 <= len(key) <= MAX_KEY or any(not " " <= c <= "~" for c in key):
        raise InvalidRequest("Idempotency-Key must be 1 to 255 printable ASCII characters")
    return key
