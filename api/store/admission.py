"""Each caller's limits, shared by every worker: requests and tokens per minute, streams at once.

The limits themselves come with each call (a named key may carry its own, api/keyring.py): the
scripts take them as arguments, so a change of them applies from the next request, on every worker.

Admission is one script (`admit.lua`), so one round trip, on Redis's clock; it checks every limit and
takes from them only if all allow the request, so concurrent requests on any number of workers can
never overshoot. An admitted request holds a lease until `settle.lua` gives it back, charges the
tokens its turn used and counts its usage (`usage.py`); the lease expires on its own if its worker dies.
With no limit configured there is no lease to take, but a turn is still settled, for its usage.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError
from redis.typing import EncodableT

from api.config import Settings
from api.errors import StoreUnavailable
from api.store.keys import tenant_key
from api.store.redis import Client
from api.store.scripts import Bundle, ScriptCall, Scripts, give_back
from api.store.usage import TurnUsage, settle_args, settle_keys

WINDOW_MS = 60_000

_MESSAGES = {
    "requests": "over the limit of {limit} requests per minute; retry after Retry-After seconds",
    "tokens": "over the limit of {limit} tokens per minute; retry after Retry-After seconds",
    "streams": "over the limit of {limit} replies streaming at once; retry when one ends",
}


@dataclass(frozen=True, slots=True)
class Limits:
    """One caller's limits; 0 is no limit."""

    requests: int = 0  # per minute
    tokens: int = 0  # per minute
    streams: int = 0  # at once

    @classmethod
    def defaults(cls, settings: Settings) -> Limits:
        return cls(settings.rate_limit_requests, settings.rate_limit_tokens, settings.rate_limit_concurrent)

    @property
    def unlimited(self) -> bool:
        return not (self.requests or self.tokens or self.streams)


@dataclass(frozen=True, slots=True)
class Quota:
    """The request limit as the caller sees it, for the RateLimit-* headers."""

    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"ratelimit-limit", b"%d" % self.limit),
            (b"ratelimit-remaining", b"%d" % self.remaining),
            (b"ratelimit-reset", b"%d" % self.reset_seconds),
        ]


@dataclass(slots=True)
class Ticket:
    """An admitted request's hold on its caller's limits: a stream lease, and tokens still to charge."""

    keys: tuple[str, str, str]
    lease: str
    tokens_limit: int = 0  # the caller's tokens per minute when it was admitted
    settled: bool = False
    leased: bool = True  # False when no limit is configured: nothing was taken, only usage is settled


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    ticket: Ticket | None = None  # None when refused, or when no limit is configured
    quota: Quota | None = None  # None without a request limit
    message: str = ""
    retry_after: float = 0.0


class Admission:
    def __init__(
        self,
        redis: Client,
        scripts: Scripts,
        settings: Settings,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.redis = redis
        self.on_error = on_error  # told of every Redis failure, e.g. to count it
        self.scripts = scripts
        self.prefix = settings.redis_prefix
        self.defaults = Limits.defaults(settings)  # for a caller that brings no limits of its own
        self.lease_ttl_ms = max(1, int(settings.lock_ttl_seconds * 1000))
        self.usage_retention_days = settings.usage_retention_days

    def keys(self, subject: str) -> tuple[str, str, str]:
        """The caller's limits, stream leases and recent settlements (admit.lua reads the first two)."""
        return (
            tenant_key(self.prefix, subject, "limits"),
            tenant_key(self.prefix, subject, "streams"),
            tenant_key(self.prefix, subject, "settled"),
        )

    async def admit(self, subject: str, limits: Limits | None = None) -> Decision:
        """Check and take every limit at once; a refused request takes nothing. `limits` are the
        caller's own, else the defaults.

        A reply that never came back (or could not be read) may leave the lease taken: it is settled
        at once, for nothing, rather than hold one of the caller's streams for a lease ttl.
        """
        limits = self.limits(limits)
        if limits.unlimited:
            return Decision(True, Ticket(self.keys(subject), secrets.token_hex(12), leased=False))
        ticket = self.ticket(subject, limits)
        try:
            reply = await self.admit_call(ticket, limits).run()
            return self.decision(ticket, reply, limits)
        except BaseException as exc:
            await give_back(self.settle_call(ticket, None))
            if isinstance(exc, RedisError):
                raise self.unavailable() from exc
            raise

    async def admit_then(
        self, subject: str, limits: Limits, then: ScriptCall, undo: ScriptCall, bundle: Bundle
    ) -> tuple[Decision, Any]:
        """`admit`, and in the same script `then`, run only if the request was admitted; its reply
        comes second (None when refused). If the reply is lost, `undo` gives back what `then` took."""
        ticket = self.ticket(subject, limits)
        try:
            replies = await bundle.run([self.admit_call(ticket, limits), then], gated=True)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            decision = self.decision(ticket, replies[0], limits)
            return decision, replies[1] if decision.allowed else None
        except BaseException as exc:
            await give_back(self.settle_call(ticket, None))
            await give_back(undo)
            if isinstance(exc, RedisError):
                raise self.unavailable() from exc
            raise

    def limits(self, limits: Limits | None) -> Limits:
        """The caller's own limits, else the defaults."""
        return self.defaults if limits is None else limits

    def ticket(self, subject: str, limits: Limits) -> Ticket:
        """A new request's hold on `subject`'s limits, not yet taken (see `admit_call`)."""
        return Ticket(self.keys(subject), secrets.token_hex(12), limits.tokens)

    def admit_call(self, ticket: Ticket, limits: Limits) -> ScriptCall:
        """The call that admits `ticket`'s request; its reply goes to `decision`."""
        return ScriptCall(self.scripts.admit, ticket.keys[:2], self._args("1", ticket.lease, limits))

    def decision(self, ticket: Ticket, reply: list[Any], limits: Limits) -> Decision:
        quota = self._quota(reply, limits)
        if reply[0] == 1:
            return Decision(True, ticket, quota)
        refused_by = _text(reply[1])
        retry_after = max(1, math.ceil(int(reply[2]) / 1000))
        limit = {"requests": limits.requests, "tokens": limits.tokens}.get(refused_by, limits.streams)
        return Decision(False, None, quota, _MESSAGES[refused_by].format(limit=limit), retry_after)

    async def peek(self, subject: str, limits: Limits | None = None) -> Quota | None:
        """The request limit as it stands, taking nothing: for responses refused before admission."""
        limits = self.limits(limits)
        if not limits.requests:
            return None
        try:
            reply = await self.scripts.admit(keys=self.keys(subject)[:2], args=self._args("0", "", limits))
        except RedisError as exc:
            raise self.unavailable() from exc
        return self._quota(reply, limits)

    def unavailable(self) -> StoreUnavailable:
        if self.on_error is not None:
            self.on_error()
        # Refusing is the safe side: letting requests through unchecked would hand out Claude's
        # capacity (and its bill) without any of the limits this deployment asked for.
        return StoreUnavailable("the limits cannot be checked now; try again shortly", retry_after=1)

    def settle_call(self, ticket: Ticket, usage: TurnUsage | None) -> ScriptCall:
        """Give back the ticket's lease and, for a turn that reached Claude, charge and count `usage`
        (against the tokens limit the caller had when admitted)."""
        if usage is None:
            return ScriptCall(
                self.scripts.settle, ticket.keys, [ticket.lease, 0, ticket.tokens_limit, WINDOW_MS]
            )
        today = datetime.now(UTC).date()
        return ScriptCall(
            self.scripts.settle,
            [*ticket.keys, *settle_keys(ticket.keys[0], today)],
            [
                ticket.lease,
                usage.limited(),
                ticket.tokens_limit,
                WINDOW_MS,
                *settle_args(usage, today, self.usage_retention_days),
            ],
        )

    def renew_call(self, ticket: Ticket) -> ScriptCall:
        return ScriptCall(self.scripts.renew_lease, ticket.keys[1:], [ticket.lease, self.lease_ttl_ms])

    def _args(self, take: str, lease: str, limits: Limits) -> list[EncodableT]:
        return [take, lease, limits.requests, limits.tokens, limits.streams, self.lease_ttl_ms, WINDOW_MS]

    def _quota(self, reply: list[Any], limits: Limits) -> Quota | None:
        remaining = int(reply[3])
        if remaining < 0:
            return None
        return Quota(limits.requests, remaining, math.ceil(int(reply[4]) / 1000))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
