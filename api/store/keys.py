"""Redis key names. Every key of one session shares a hash tag, so a session lives in one cluster slot."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SessionKeys:
    history: str
    meta: str
    lock: str

    def all(self) -> tuple[str, str, str]:
        return (self.history, self.meta, self.lock)

    # Keys of a turn in flight, named from the lock's so they share the session's hash tag.

    def reply_log(self, token: str) -> str:
        """The stream its readers follow (see `replies.py`), one per turn."""
        return f"{self.lock}:reply:{token}"

    def readers(self) -> str:
        """Holds the token of the turn that readers are waiting for: its commit writes the log's end."""
        return f"{self.lock}:readers"

    def idempotency(self, digest: str) -> str:
        return f"{self.lock[: -len(':lock')]}:idem:{digest}"


def session_keys(prefix: str, tenant: str, session_id: str) -> SessionKeys:
    # Tenant and session id never contain braces (both are validated), so the tag is exactly this.
    base = f"{prefix}:{{{tenant}.{session_id}}}"
    return SessionKeys(history=f"{base}:history", meta=f"{base}:meta", lock=f"{base}:lock")


def tenant_key(prefix: str, tenant: str, name: str) -> str:
    return f"{prefix}:{{t.{tenant}}}:{name}"
