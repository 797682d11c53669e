"""How each chat request ended: one report per request, logged, counted and handed to the embedder's hook."""

from __future__ import annotations

import enum
import inspect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields

log = logging.getLogger("api.turns")


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    CLIENT_DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
    CLIENT_DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
    UPSTREAM_ERROR = "upstream_error"
    REJECTED = "rejected"
    UNKNOWN_ERROR = "unknown_error"


@dataclass(slots=True)
class TurnReport:
    request_id: str
    session_id: str | None = None
    key: str | None = None  # the API key's name (never the key); None on an open API
    outcome: Outcome = Outcome.UNKNOWN_ERROR
    status: int = 0
    error_type: str | None = None
    detail: str | None = None
    upstream_error: str | None = None  # one of api.upstream.client.UPSTREAM_ERRORS when Claude failed
    model: str | None = None
    input_tokens: int = 0  # as Claude reports it: the prompt's tokens not read from or written to its cache
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    duration_seconds: float = 0.0
    first_token_seconds: float | None = None
    upstream_request_id: str | None = None
    committed: bool = False
    resumed: bool = False  # its client left, and the turn ran on to its end for a reader who came
    replayed: bool = False  # a repeat of an idempotent turn: its reply was sent again, nothing ran
    tenant: str | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, object]:
        # Every field is a plain value: no need for `asdict`'s recursive deep copy on every request.
        data: dict[str, object] = {name: getattr(self, name) for name in _LOGGED_FIELDS}
        data["outcome"] = self.outcome.value
        data["duration_seconds"] = round(self.duration_seconds, 4)
        if self.first_token_seconds is not None:
            data["first_token_seconds"] = round(self.first_token_seconds, 4)
        return data


_LOGGED_FIELDS = tuple(f.name for f in fields(TurnReport) if f.name != "tenant")

TurnHook = Callable[[TurnReport], Awaitable[None] | None]


class OutcomeRecorder:
    """Logs one structured line per request, counts outcomes and calls the optional hook.

    It also knows which requests are in flight (begun and not yet recorded): a draining worker waits
    for none to be left, and `in_flight_watchers` hear the count whenever it changes.
    """

    def __init__(self, hook: TurnHook | None = None) -> None:
        self.hook = hook
        self.counts: Counter[Outcome] = Counter()
        self.observers: list[Callable[[TurnReport], None]] = []
        self.in_flight_watchers: list[Callable[[int], None]] = []
        # By identity: a report recorded without having begun (refused before the turn started)
        # must not take another request off the count.
        self._open: set[int] = set()

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def begin(self, report: TurnReport) -> None:
        self._open.add(id(report))
        self._in_flight_changed()

    async def record(self, report: TurnReport) -> None:
        if id(report) in self._open:
            self._open.discard(id(report))
            self._in_flight_changed()
        self.counts[report.outcome] += 1
        level = logging.WARNING if report.outcome is Outcome.UNKNOWN_ERROR else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "turn %s", report.outcome.value, extra={"turn": report.as_dict()})
        for observe in self.observers:
            observe(report)
        if self.hook is None:
            return
        try:
            result = self.hook(report)
            if inspect.isawaitable(result):
                await result
        except Exception:
            # The embedder's hook must not turn a finished request into a failed one.
            log.exception("on_turn_end hook failed for request %s", report.request_id)

    def _in_flight_changed(self) -> None:
        for watch in self.in_flight_watchers:
            watch(len(self._open))
