"""What each caller spent, per UTC day and model: written by `settle.lua` in the step that settles a
turn, read by `GET /usage`.

A day is one hash in the caller's slot (`{t.<subject>}`, beside its limits), so that one script
settles the turn and counts it, and a range of days is read in one round trip on a cluster too. Its
fields are `<count>:<model>`; it expires `retention_days` after the day ended. The settle that counts
a turn is recognised when it is sent again, so a turn is counted once, whichever worker ran it.

The day is Redis's: the worker names the hashes of its yesterday, today and tomorrow, and the script
writes the one its clock says, so workers whose clocks disagree still count a turn on the same day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from redis.typing import EncodableT

from api.store.keys import tenant_key
from api.store.redis import Client

EPOCH = date(1970, 1, 1)
COUNTS = (
    "turns",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


@dataclass(frozen=True, slots=True)
class TurnUsage:
    """What one turn used, as Claude reported it (a cut reply's output at least what reached the client)."""

    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    def limited(self) -> int:
        """The tokens `CHAT_RATE_LIMIT_TOKENS` charges: as Anthropic's own limits count them on most
        models, a prompt's cache reads are not charged, and its cache writes are."""
        return self.input_tokens + self.cache_creation_input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class DayUsage:
    day: date
    model: str
    counts: dict[str, int]


def day_key(prefix: str, subject: str, day: date) -> str:
    return tenant_key(prefix, subject, f"usage:{day.isoformat()}")


def settle_keys(limits_key: str, today: date) -> list[str]:
    """The hashes of the worker's yesterday, today and tomorrow, named from the caller's limits key
    (`tenant_key(..., "limits")`) so that they share its slot."""
    base = limits_key.removesuffix("limits")
    return [f"{base}usage:{(today + timedelta(days=offset)).isoformat()}" for offset in (-1, 0, 1)]


def settle_args(usage: TurnUsage, today: date, retention_days: int) -> list[EncodableT]:
    return [
        (today - EPOCH).days,
        retention_days,
        usage.model,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
    ]


async def read_days(redis: Client, prefix: str, subject: str, first: date, last: date) -> list[DayUsage]:
    """Every day and model with usage from `first` to `last`, both included, oldest first."""
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    async with redis.pipeline(transaction=False) as pipe:
        for day in days:
            pipe.hgetall(day_key(prefix, subject, day))
        replies: list[dict[Any, Any]] = await pipe.execute()
    out: list[DayUsage] = []
    for day, fields in zip(days, replies, strict=True):
        models: dict[str, dict[str, int]] = {}
        for field, value in fields.items():
            name, _, model = _text(field).partition(":")
            if name in COUNTS:
                models.setdefault(model, dict.fromkeys(COUNTS, 0))[name] = int(value)
        out += [DayUsage(day, model, models[model]) for model in sorted(models)]
    return out


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
