"""`GET /usage`: the range of UTC days a request asks for, checked, and the caller's usage over it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from api.errors import InvalidRequest
from api.store.redis import Client
from api.store.usage import COUNTS, DayUsage, read_days

DEFAULT_DAYS = 30
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True, slots=True)
class UsageReport:
    first: date
    last: date
    days: list[DayUsage]

    def totals(self) -> dict[str, int]:
        return {name: sum(day.counts[name] for day in self.days) for name in COUNTS}


def day_range(start: str | None, end: str | None, longest: int, today: date) -> tuple[date, date]:
    """The days from `start` to `end` (both included) as the query string gave them: `end` defaults to
    today, `start` to 30 days (or `longest`, if fewer) ending on `end`; at most `longest` days."""
    last = _day("to", end) if end is not None else today
    first = (
        _day("from", start) if start is not None else last - timedelta(days=min(DEFAULT_DAYS, longest) - 1)
    )
    if first > last:
        raise InvalidRequest("from must not be after to")
    if (last - first).days + 1 > longest:
        raise InvalidRequest(f"a range covers at most {longest} days (CHAT_USAGE_RETENTION_DAYS)")
    return first, last


def _day(name: str, text: str) -> date:
    if _DATE.fullmatch(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
    raise InvalidRequest(f"{name} must be a date as YYYY-MM-DD (a UTC day)")


async def usage_report(
    redis: Client, prefix: str, subject: str, start: str | None, end: str | None, retention_days: int
) -> UsageReport:
    first, last = day_range(start, end, retention_days, datetime.now(UTC).date())
    return UsageReport(first, last, await read_days(redis, prefix, subject, first, last))
