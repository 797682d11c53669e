"""Log set-up: plain text for people, one JSON object per line for collectors."""

from __future__ import annotations

import logging
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
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        turn = getattr(record, "turn", None)
        if isinstance(turn, dict):
            text += " " + " ".join(f"{key}={value}" for key, value in turn.items() if value not in (None, ""))
        elif (request_id := REQUEST_ID.get()) is not None:
            text += f" request_id={request_id}"
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
