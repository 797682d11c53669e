"""A local stand-in for Claude that speaks the Messages API wire protocol.

The real ``anthropic`` client runs against it unmodified (``base_url=standin.url``), with no key and no
network. The reply echoes the last user message, ``echo: <text> [turns=N]``, streamed word by word.

Tokens in the last user message pick per-request behaviour, so tests and benchmarks in other processes
can steer it with no shared state (they are removed from the echoed text; unknown ``@@`` tokens stay):

    @@deltas=K          reply with exactly K deltas "w0 ", "w1 ", ...
    @@delta_chars=N     with @@deltas, pad each of those words with "x" to N characters, space included
    @@delay=S           seconds between deltas (default: the server's ``delay``)
    @@first_delay=S     seconds between the response headers and message_start
    @@status=CODE       answer with that 4xx/5xx status and the matching Anthropic error body
    @@fail_attempts=N   apply @@status only while x-stainless-retry-count < N (header absent: always)
    @@retry_after=S     add ``retry-after: S`` to that error response
    @@should_retry=B    add ``x-should-retry: true|false`` to that error response
    @@error_after=K     after K deltas send an in-stream overloaded_error event, then end the body
    @@drop_after=K      after K deltas reset the TCP connection (RST)
    @@close_after=K     after K deltas close the connection (FIN) without the terminating chunk
    @@eof_after=K       after K deltas end the body cleanly, without message_stop
    @@hang_after=K      after K deltas send nothing more until the client goes away
    @@hang_before       never send the response headers
    @@pings             add ping, unknown and ``event:``-less events to exercise SSE parsers
    @@unicode           append " héllo 世界 🙂" to the reply

Prompt caching is emulated as the API does it (`api/dev/prompt_cache.py`): a prefix marked with
``cache_control`` and at least ``cache_min_tokens`` long is written, and read by a later request that
starts with it, which message_start's usage reports. ``usage`` keeps what each reply reported.

A non-streaming reply is sent after ``first_delay + delay * deltas`` seconds; the mid-stream faults apply
to streams only, and count_tokens honours only the @@status family.
``python -m api.dev.standin --port 8001`` serves until SIGINT/SIGTERM and prints ``listening on <url>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http
import logging
import math
import os
import re
import secrets
import signal
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, cast

import orjson

from api.dev.prompt_cache import DEFAULT_MIN_TOKENS, DEFAULT_TTL_SECONDS, PromptCache, TooManyBreakpoints

__all__ = ["RecordedRequest", "ReportedUsage", "StandInModel", "StandInThread", "main"]

log = logging.getLogger(__name__)

MAX_RECORDED = 10_000
_MAX_HEAD = 64 * 1024
_MAX_BODY = 32 * 1024 * 1024
_YIELD_EVERY = 64  # with no delay, a long reply still yields now and then so it cannot starve other streams
_MESSAGES = "/v1/messages"
_COUNT_TOKENS = "/v1/messages/count_tokens"
_UNICODE_WORDS = ("héllo ", "世界 ", "🙂")
_FAULTS = ("error", "drop", "close", "eof", "hang")


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: dict[str, Any] | None  # None unless the body is a JSON object


@dataclass(slots=True)
class ReportedUsage:
    """The usage one reply reported: message_start's, and its final output_tokens once it completed."""

    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    output_tokens: int = 1


# --- wire constants: built once, so each event costs one formatting step and one write -------------------


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)


def _event(name: bytes, data: bytes) -> bytes:
    return _chunk(b"event: " + name + b"\ndata: " + data + b"\n\n")


_CB_START = _event(
    b"content_block_start",
    b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
)
_PING = _event(b"ping", b'{"type":"ping"}')
_FUTURE = _event(b"future_event", b'{"type":"future_event"}')
_DATA_ONLY = _chunk(b'data: {"type":"data_only"}\n\n')
_CB_STOP = _event(b"content_block_stop", b'{"type":"content_block_stop","index":0}')
_MSG_STOP = _event(b"message_stop", b'{"type":"message_stop"}')
_LAST_CHUNK = b"0\r\n\r\n"
_MSG_START = (
    b'{"type":"message_start","message":{"id":"%b","type":"message","role":"assistant","model":%b,'
    b'"content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":%d,"output_tokens":1,'
    b'"cache_creation_input_tokens":%d,"cache_read_input_tokens":%d,"service_tier":"standard"}}}'
)
_MESSAGE = (
    b'{"id":"%b","type":"message","role":"assistant","model":%b,"content":[{"type":"text","text":%b}],'
    b'"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":%d,"output_tokens":%d,'
    b'"cache_creation_input_tokens":%d,"cache_read_input_tokens":%d,"service_tier":"standard"}}'
)
_MSG_DELTA = (
    b'{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":%d}}'
)
_DELTA_HEAD = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":'
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\ncache-control: no-cache\r\nrequest-id: %b\r\n%b\r\n"
)
_CLOSE_LINE = "connection: close\r\n"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _delta_chunk(text: str) -> bytes:
    if len(text) < 64:  # benchmark replies repeat the same short words; long ones are not worth keeping
        return _cached_delta_chunk(text)
    return _chunk(_DELTA_HEAD + orjson.dumps(text) + b"}}\n\n")


@functools.lru_cache(maxsize=8192)
def _cached_delta_chunk(text: str) -> bytes:
    return _chunk(_DELTA_HEAD + orjson.dumps(text) + b"}}\n\n")


def _tail(output_tokens: int) -> bytes:
    return _CB_STOP + _event(b"message_delta", _MSG_DELTA % output_tokens) + _MSG_STOP + _LAST_CHUNK


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Overloaded" if status == 529 else "Error"


def _error_body(status: int, message: str, request_id: str) -> bytes:
    kind = _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps(
        {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    )


# --- request inspection ------------------------------------------------------------------------------------


class _Reject(Exception):
    """Answer the request with this status and an Anthropic error body."""

    def __init__(self, message: str, status: int = 400, extra_headers: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.extra_headers = extra_headers


@dataclass(slots=True)
class _Directives:
    deltas: int | None = None
    delta_chars: int = 0
    delay: float | None = None
    first_delay: float = 0.0
    status: int | None = None
    fail_attempts: int | None = None
    retry_after: float | None = None
    should_retry: bool | None = None
    fault: str | None = None  # one of _FAULTS
    fault_at: int = 0
    hang_before: bool = False
    pings: bool = False
    unicode: bool = False


_KINDS: dict[str, type] = {
    **dict.fromkeys(
        ["deltas", "delta_chars", "status", "fail_attempts", *(f"{f}_after" for f in _FAULTS)], int
    ),
    **dict.fromkeys(["delay", "first_delay", "retry_after"], float),
    **dict.fromkeys(["should_retry", "hang_before", "pings", "unicode"], bool),
}
_DIRECTIVE = re.compile(r"@@([a-z_]+)(?:=(\S*))?")


def _directive_value(name: str, raw: str | None) -> object:
    kind, text = _KINDS[name], raw or ""
    if kind is bool and raw in (None, "true", "false"):
        return raw != "false"
    if kind is int and text.isascii() and text.isdigit():
        number = int(text)
        if name != "status" or 400 <= number < 600:
            return number
    if kind is float:
        with contextlib.suppress(ValueError):
            if 0 <= (seconds := float(text or "nan")) < math.inf:
                return seconds
    raise _Reject(f"invalid value for @@{name}: {raw!r}")


def _parse_directives(text: str) -> tuple[_Directives, str]:
    """Return the directives in ``text`` and the text without them, whitespace collapsed."""
    d = _Directives()

    def take(m: re.Match[str]) -> str:
        name, raw = m.group(1), m.group(2)
        if name not in _KINDS:
            return m.group(0)
        value = _directive_value(name, raw)
        if (fault := name.removesuffix("_after")) in _FAULTS:
            if d.fault is not None:
                raise _Reject("give at most one of @@error_after/drop_after/close_after/eof_after/hang_after")
            d.fault, d.fault_at = fault, int(raw or 0)
        else:
            setattr(d, name, value)
        return " "

    return d, " ".join((_DIRECTIVE.sub(take, text) if "@@" in text else text).split())


def _has_text(block: Any) -> bool:
    return isinstance(block, dict) and isinstance(block.get("text"), str)


def _block_text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(b["text"] for b in content if _has_text(b) and b.get("type") == "text")
    return content if isinstance(content, str) else ""


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(b["text"]) if _has_text(b) else _chars(b) for b in value)
    return 0 if value is None else len(orjson.dumps(value))


def _check_body(body: dict[str, Any], *, needs_max_tokens: bool) -> None:
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _Reject("model: Field required")
    max_tokens = body.get("max_tokens")
    if needs_max_tokens and (type(max_tokens) is not int or max_tokens < 1):
        raise _Reject("max_tokens: Field required (a positive integer)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Reject("messages: Field required (a non-empty list)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise _Reject(f"messages.{i}.role: must be 'user' or 'assistant'")
        if not isinstance(m.get("content"), str | list):
            raise _Reject(f"messages.{i}.content: Field required")


@dataclass(slots=True)
class _Reply:
    model: bytes  # JSON-encoded
    input_tokens: int
    deltas: list[str]
    delay: float
    d: _Directives
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


def _plan_reply(body: dict[str, Any], default_delay: float) -> _Reply:
    messages = body["messages"]
    last_user = next((m for m in reversed(messages) if m["role"] == "user"), None)
    d, text = _parse_directives(_block_text(last_user["content"]) if last_user else "")
    if d.deltas is not None:
        deltas = [f"w{i}".ljust(d.delta_chars - 1, "x") + " " for i in range(d.deltas)]
        if d.unicode:
            deltas.extend(_UNICODE_WORDS)
    else:
        turns = sum(1 for m in messages if m["role"] == "user")
        words = f"echo: {text} [turns={turns}]".split()
        if d.unicode:
            words.extend(w.strip() for w in _UNICODE_WORDS)
        deltas = [w + " " for w in words[:-1]] + words[-1:]
    chars = _chars(body.get("system")) + sum(_chars(m["content"]) for m in messages)
    delay = default_delay if d.delay is None else d.delay
    return _Reply(orjson.dumps(body["model"]), max(1, chars // 4), deltas, delay, d)


# --- connections -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


def _message(reply: _Reply) -> bytes:
    text = orjson.dumps("".join(reply.deltas))
    return _MESSAGE % (
        _new_id("msg_").encode(),
        reply.model,
        text,
        reply.input_tokens,
        len(reply.deltas),
        reply.cache_creation_input_tokens,
        reply.cache_read_input_tokens,
    )


async def _forever() -> None:
    # Parked until the connection is lost, which cancels the task.
    await asyncio.get_running_loop().create_future()


class _Connection(asyncio.Protocol):
    """One client connection: parses requests in order and answers them one at a time."""

    def __init__(self, owner: StandInModel) -> None:
        self._owner = owner
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._stream_open = False
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so this is a cast, not a check.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._owner._connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._task is None:
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._buf.clear()
        self._owner._connections.discard(self)
        if self._stream_open:
            self._stream_open = False
            self._owner.active_streams -= 1
            self._owner.streams_cancelled += 1
        if self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def close(self, *, reset: bool = False) -> None:
        self._closing = True
        if self._transport is None:
            return
        if reset:
            sock = self._transport.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):  # linger 0: close() sends RST, not FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._transport.abort()
        else:
            self._transport.close()

    def _end_stream(self, *, completed: bool) -> None:
        if self._stream_open:
            self._stream_open = False
            self._owner.active_streams -= 1
            if completed:
                self._owner.streams_completed += 1
            else:
                self._owner.streams_faulted += 1

    def _send(self, req: _Request | None, status: int, body: bytes, request_id: str, extra: str = "") -> None:
        assert self._transport is not None
        keep_alive = req is not None and req.keep_alive
        head = (
            f"HTTP/1.1 {status} {_reason(status)}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nrequest-id: {request_id}\r\n{extra}"
            f"{'' if keep_alive else _CLOSE_LINE}\r\n"
        )
        self._transport.write(head.encode("latin-1") + body)
        if not keep_alive:
            self.close()

    def _error(self, req: _Request | None, status: int, message: str, extra: str = "") -> None:
        request_id = _new_id("req_")
        self._send(req, status, _error_body(status, message, request_id), request_id, extra)

    def _process(self) -> None:
        while self._task is None and not self._closing:
            req = None
            try:
                req = self._next_request()
                if req is None:
                    return
                work = self._respond(req)
            except _Reject as exc:  # with req None (unusable framing) the connection is closed after
                self._error(req, exc.status, str(exc), exc.extra_headers)
                continue
            except Exception:
                log.exception("stand-in failed to answer a request")
                self._error(req, 500, "Internal server error")
                continue
            if work is not None:
                self._task = task = asyncio.get_running_loop().create_task(work)
                self._owner._tasks.add(task)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._owner._tasks.discard(task)
        self._task = None
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            log.error("stand-in request failed", exc_info=exc)
            self.close(reset=True)
        elif not self._closing:
            self._process()  # requests pipelined behind this one

    def _next_request(self) -> _Request | None:
        buf = self._buf
        while buf.startswith(b"\r\n"):  # stray CRLFs between requests are allowed
            del buf[:2]
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                raise _Reject("request headers too large", 431)
            return None
        lines = buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Reject("malformed request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _Reject("malformed header line")
            headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length", "0")
        if "transfer-encoding" in headers or not (length.isascii() and length.isdigit()):
            raise _Reject("request bodies need a content-length")
        if int(length) > _MAX_BODY:
            raise _Reject("request body too large", 413)
        total = end + 4 + int(length)
        if len(buf) < total:
            return None
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        method, target, version = parts
        conn = headers.get("connection", "").lower()
        keep_alive = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        return _Request(method, target.split("?", 1)[0], headers, body, keep_alive)

    def _respond(self, req: _Request) -> Coroutine[Any, Any, None] | None:
        """Answer ``req`` now, or return the coroutine that will answer it."""
        owner = self._owner
        problem = "request body must be a JSON object"
        try:
            parsed = orjson.loads(req.body) if req.body else None
        except orjson.JSONDecodeError as exc:
            parsed, problem = None, f"request body is not valid JSON: {exc}"
        body = parsed if isinstance(parsed, dict) else None
        owner._record(RecordedRequest(req.method, req.path, req.headers, body))
        if req.method != "POST" or req.path not in (_MESSAGES, _COUNT_TOKENS):
            raise _Reject(f"{req.method} {req.path} not found", 404)
        if not owner._authorized(req.headers):
            raise _Reject("invalid x-api-key", 401)
        if body is None:
            raise _Reject(problem)
        _check_body(body, needs_max_tokens=req.path == _MESSAGES)
        reply = _plan_reply(body, owner.delay)
        d = reply.d
        attempt = req.headers.get("x-stainless-retry-count", "")
        if d.status is not None and (
            d.fail_attempts is None
            or not (attempt.isascii() and attempt.isdigit())
            or int(attempt) < d.fail_attempts
        ):
            extra = "" if d.retry_after is None else f"retry-after: {d.retry_after:g}\r\n"
            if d.should_retry is not None:
                extra += f"x-should-retry: {str(d.should_retry).lower()}\r\n"
            message = "Overloaded" if d.status == 529 else f"{_reason(d.status)} (@@status)"
            raise _Reject(message, d.status, extra)
        if req.path == _COUNT_TOKENS:
            self._send(req, 200, b'{"input_tokens":%d}' % reply.input_tokens, _new_id("req_"))
            return None
        try:
            cached = owner.prompt_cache.usage(body, reply.input_tokens)
        except TooManyBreakpoints as exc:
            raise _Reject(str(exc)) from None
        reply.input_tokens = cached.input_tokens
        reply.cache_creation_input_tokens = cached.cache_creation_input_tokens
        reply.cache_read_input_tokens = cached.cache_read_input_tokens
        usage = ReportedUsage(
            cached.input_tokens, cached.cache_creation_input_tokens, cached.cache_read_input_tokens
        )
        owner._report(usage)
        if body.get("stream") is True:
            return self._stream(req, reply, usage)
        usage.output_tokens = len(reply.deltas)
        wait = d.first_delay + reply.delay * len(reply.deltas)
        if d.hang_before or wait > 0:
            return self._send_message_later(req, reply, wait)
        self._send(req, 200, _message(reply), _new_id("req_"))
        return None

    async def _send_message_later(self, req: _Request, reply: _Reply, wait: float) -> None:
        if reply.d.hang_before:
            await _forever()
        await asyncio.sleep(wait)
        self._send(req, 200, _message(reply), _new_id("req_"))

    async def _stream(self, req: _Request, reply: _Reply, usage: ReportedUsage) -> None:
        owner, transport, d = self._owner, self._transport, reply.d
        assert transport is not None
        owner.streams_started += 1
        owner.active_streams += 1
        self._stream_open = True
        if d.hang_before:
            await _forever()
        request_id = _new_id("req_")
        head = _SSE_HEAD % (request_id.encode(), b"" if req.keep_alive else _CLOSE_LINE.encode())
        start = _MSG_START % (
            _new_id("msg_").encode(),
            reply.model,
            reply.input_tokens,
            reply.cache_creation_input_tokens,
            reply.cache_read_input_tokens,
        )
        start = _event(b"message_start", start) + _CB_START + _PING + (_DATA_ONLY if d.pings else b"")
        if d.first_delay > 0:
            transport.write(head)
            await asyncio.sleep(d.first_delay)
            transport.write(start)
        else:
            transport.write(head + start)

        deltas, delay = reply.deltas, reply.delay
        fault_at = -1 if d.fault is None else d.fault_at
        for i, text in enumerate(deltas):
            if i == fault_at:
                break
            if delay > 0:
                await asyncio.sleep(delay)
            elif i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
            while self._paused and not self._closing:  # the client reads slowly: let the buffer drain
                self._drain_waiter = asyncio.get_running_loop().create_future()
                await self._drain_waiter
            transport.write(_PING + _FUTURE + _delta_chunk(text) if d.pings and i else _delta_chunk(text))

        if d.fault is None:
            usage.output_tokens = len(deltas)
            transport.write(_tail(len(deltas)))
            self._end_stream(completed=True)
        elif d.fault == "hang":
            await _forever()
        else:
            self._end_stream(completed=False)
            if d.fault in ("drop", "close"):
                self.close(reset=d.fault == "drop")
            elif d.fault == "error":
                error = {"type": "overloaded_error", "message": "Overloaded"}
                data = orjson.dumps({"type": "error", "error": error, "request_id": request_id})
                transport.write(_event(b"error", data) + _LAST_CHUNK)
            else:  # eof
                transport.write(_LAST_CHUNK)
        if not req.keep_alive:
            self.close()


# --- public API --------------------------------------------------------------------------------------------


class StandInModel:
    """The stand-in server. Counters and ``requests`` are updated on the server's event loop."""

    def __init__(
        self,
        *,
        delay: float = 0.0,
        api_key: str | None = None,
        cache_min_tokens: int = DEFAULT_MIN_TOKENS,
        cache_ttl: float = DEFAULT_TTL_SECONDS,
    ) -> None:
        if not 0 <= delay < math.inf:
            raise ValueError(f"delay must be a non-negative number of seconds, got {delay!r}")
        self.delay = delay
        self.api_key = api_key
        self.prompt_cache = PromptCache(cache_min_tokens, cache_ttl)
        self.usage: list[ReportedUsage] = []  # what the last MAX_RECORDED replies reported, oldest first
        self.port = 0
        self.url = ""
        self.requests: list[RecordedRequest] = []  # the last MAX_RECORDED requests, oldest first
        self.streams_started = 0
        self.streams_completed = 0  # message_stop written
        self.streams_cancelled = 0  # the connection was lost mid-stream
        self.streams_faulted = 0  # ended on purpose by an injected fault
        self.active_streams = 0
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._server is not None:
            raise RuntimeError("already started")
        loop = asyncio.get_running_loop()
        # A deep backlog: a benchmark may open thousands of connections at once.
        self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]
        shown = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        self.url = f"http://{f'[{shown}]' if ':' in shown else shown}:{self.port}"

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._connections):
            conn.close(reset=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        await asyncio.sleep(0)  # let the closed connections' connection_lost run, so counters settle

    async def __aenter__(self) -> StandInModel:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _record(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        if len(self.requests) > MAX_RECORDED:
            del self.requests[0]

    def _report(self, usage: ReportedUsage) -> None:
        self.usage.append(usage)
        if len(self.usage) > MAX_RECORDED:
            del self.usage[0]

    def _authorized(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        key = (auth[7:].strip() if auth[:7].lower() == "bearer " else "") or headers.get("x-api-key", "")
        if self.api_key is None:
            return bool(key)
        return secrets.compare_digest(key.encode(), self.api_key.encode())


class StandInThread:
    """Runs a :class:`StandInModel` on its own event loop in a daemon thread, for synchronous callers."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
        api_key: str | None = None,
        cache_min_tokens: int = DEFAULT_MIN_TOKENS,
    ) -> None:
        self.model = StandInModel(delay=delay, api_key=api_key, cache_min_tokens=cache_min_tokens)
        self._address = (host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StandInModel:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="standin", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.model.start(*self._address), self._loop).result(10)
        except BaseException:
            self._shut_down()
            raise
        return self.model

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.model.stop(), self._loop).result(10)
            self._shut_down()

    def _shut_down(self) -> None:
        loop, thread = self._loop, self._thread
        assert loop is not None
        assert thread is not None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        if not thread.is_alive():
            loop.close()


async def _serve(args: argparse.Namespace) -> None:
    model = StandInModel(delay=args.delay, api_key=args.api_key, cache_min_tokens=args.cache_min_tokens)
    await model.start(args.host, args.port)
    print(f"listening on {model.url}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await model.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m api.dev.standin", description="Local stand-in for Claude."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between streamed deltas")
    parser.add_argument("--api-key", help="accept only this key (default: any non-empty key)")
    parser.add_argument(
        "--cache-min-tokens",
        type=int,
        default=DEFAULT_MIN_TOKENS,
        help="the shortest prefix, in tokens, the prompt cache keeps",
    )
    import uvloop  # the event loop the workers run on too; a benchmark's upstream must not be the bottleneck

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
