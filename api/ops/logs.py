"""Log set-up: plain text for people, one JSON object per line for collectors.

Either way a record is one line, whatever a client sent: the text format escapes every character
that is not printable (a newline, a carriage return, NUL, U+2028...) in every value it prints, and
quotes a field's value logfmt-style when it holds a space, '=' or '"', so no value can pass for a line
or a field of its own. In JSON the encoder escapes control characters, and NEL, U+2028 and U+2029
are escaped as well.
"""

from __future__ import annotations

import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

import orjson

from api.config import Settings
from api.errors import StreamAborted

# The id of the request being served, set by the app's request-id middleware.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        turn = getattr(record, "turn", None)
        if isinstance(turn, dict):
            line.update(turn)
        elif (request_id := REQUEST_ID.get()) is not None:
            line["request_id"] = request_id
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        text = orjson.dumps(line, default=str).decode()
        # JSON lets these stand unescaped in a string, and splitlines() and some collectors end a
        # line at each of them.
        if not text.isascii():
            text = text.translate(_JSON_LINE_BREAKS)
        return text


_JSON_LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


def printable(text: str) -> str:
    """`text` with each character that is not printable written as its escape (`\\n`, `\\x00`, `\\u2028`)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def field_value(value: object) -> str:
    """A `key=value` field's value: bare when that is unambiguous, else in quotes with `"` and `\\`
    escaped too."""
    text = str(value)
    if text and text.isprintable() and not _QUOTED.search(text):
        return text
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else _escape(c) for c in text) + '"'


_QUOTED = re.compile(r'[ ="\\]')


def _escape(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    return repr(c)[1:-1]  # repr spells out exactly the characters that are not printable


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = printable(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        turn = getattr(record, "turn", None)
        if isinstance(turn, dict):
            text += "".join(
                f" {key}={field_value(value)}" for key, value in turn.items() if value not in (None, "")
            )
        elif (request_id := REQUEST_ID.get()) is not None:
            text += f" request_id={field_value(request_id)}"
        # A traceback keeps its lines, each indented: only a record's own line starts at column 0.
        if record.exc_info:
            text += "".join(
                f"\n  {printable(line)}" for line in self.formatException(record.exc_info).split("\n")
            )
        if record.stack_info:
            text += "".join(
                f"\n  {printable(line)}" for line in self.formatStack(record.stack_info).split("\n")
            )
        return text


class DropAbortedStreams(logging.Filter):
    """A reply cut short is reported by our own turn line; the server's traceback for it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StreamAborted))


def quiet_aborted_streams() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DropAbortedStreams) for f in logger.filters):
        logger.addFilter(DropAbortedStreams())


def configure_logging(settings: Settings) -> None:
    # Neither format shows the caller's file and line, the thread or the process, so a record need
    # not look them up: finding the caller walks the stack on every line, one line per request.
    logging._srcfile = None  # the documented switch (see "Optimization" in the logging HOWTO)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    quiet_aborted_streams()
    logging.getLogger("httpx2").setLevel(logging.WARNING)
