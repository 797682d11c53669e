"""The load generator: many concurrent streaming POSTs, each on its own connection, timed to the byte.

It runs as its own process (pinned to a core of its own by the bench) and speaks just enough HTTP/1.1
over raw asyncio protocols to time a stream: the request goes out, the status line and headers come
back, then chunks until the terminating zero-length chunk. Parsing that costs a few microseconds a
chunk, so the load generator stays far cheaper than anything it measures. Results go to stdout as JSON.

A stream is `ok` when it got a 200 and a complete chunked body whose text has the expected length
(text/plain) or that ends with `message_stop` (the Messages API's own stream).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

_SSE_TEXT = b'"text_delta"'
_SSE_STOP = b"event: message_stop"


@dataclass(slots=True)
class Result:
    started: float
    first: float = 0.0  # first byte of reply text
    ended: float = 0.0
    status: int = 0
    text_bytes: int = 0
    complete: bool = False
    error: str = ""


@dataclass(slots=True)
class Plan:
    host: str
    port: int
    paths: list[str]  # one template per client, `{n}` being how many sessions it used before
    body: bytes
    headers: bytes
    sse: bool  # the reply is the Messages API's SSE stream (the floor), not plain text
    expect_text: int  # bytes of text a whole reply carries; 0 to not check
    timeout: float
    results: list[Result] = field(default_factory=list)


class _Stream(asyncio.Protocol):
    """One request and its response; `done` resolves when the body ended or the connection did."""

    __slots__ = ("_buf", "_chunk_left", "_in_body", "_sse_seen", "done", "plan", "result", "transport")

    def __init__(self, plan: Plan, result: Result, done: asyncio.Future[None]) -> None:
        self.plan = plan
        self.result = result
        self.done = done
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._in_body = False
        self._chunk_left = -1  # bytes left of the current chunk's payload; -1 while reading a size line
        self._sse_seen = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if not self._in_body:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            head, buf = buf[:end], buf[end + 4 :]
            self.result.status = int(head[9:12])
            self._in_body = True
            if self.result.status != 200:
                self.result.error = f"status {self.result.status}"
                self._finish()
                return
        self._buf = self._body(buf)

    def _body(self, buf: bytes) -> bytes:
        result = self.result
        pos = 0
        size = len(buf)
        while pos < size:
            if self._chunk_left < 0:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    return buf[pos:]
                length = int(buf[pos:line_end], 16)
                pos = line_end + 2
                if length == 0:
                    result.complete = True
                    self._finish()
                    return b""
                self._chunk_left = length
            take = min(self._chunk_left, size - pos)
            if take:
                self._payload(buf[pos : pos + take])
                pos += take
                self._chunk_left -= take
            if self._chunk_left == 0:
                if size - pos < 2:
                    return buf[pos:]  # the chunk's CRLF has not arrived yet
                pos += 2
                self._chunk_left = -1
        return b""

    def _payload(self, data: bytes) -> None:
        result = self.result
        if self.plan.sse:
            if not result.first and _SSE_TEXT in data:
                result.first = time.perf_counter()
            # An event can straddle chunks; keep a little of the last one to find message_stop in.
            seen = self._sse_seen[-32:] + data
            if _SSE_STOP in seen:
                result.text_bytes = -1  # marks a stream that ended properly
            self._sse_seen = seen
            return
        if not result.first:
            result.first = time.perf_counter()
        result.text_bytes += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.result.error = self.result.error or f"connection lost: {exc or 'closed'}"
            self._finish()

    def _finish(self) -> None:
        self.result.ended = time.perf_counter()
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)


def _request(plan: Plan, path: str) -> bytes:
    return (
        b"POST %b HTTP/1.1\r\nhost: %b:%d\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"%bconnection: close\r\n\r\n%b"
        % (path.encode(), plan.host.encode(), plan.port, len(plan.body), plan.headers, plan.body)
    )


async def one_stream(plan: Plan, path: str) -> Result:
    loop = asyncio.get_running_loop()
    result = Result(started=time.perf_counter())
    done: asyncio.Future[None] = loop.create_future()
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: _Stream(plan, result, done), plan.host, plan.port), plan.timeout
        )
        if not done.done():
            transport.write(_request(plan, path))  # type: ignore[attr-defined]
        await asyncio.wait_for(done, plan.timeout)
    except (OSError, RuntimeError, TimeoutError) as exc:
        result.error = result.error or f"{type(exc).__name__}: {exc}"
        result.ended = time.perf_counter()
    if not result.error:
        if plan.sse and result.text_bytes != -1:
            result.error = "no message_stop"
        elif not plan.sse and plan.expect_text and result.text_bytes != plan.expect_text:
            result.error = f"text {result.text_bytes} bytes, expected {plan.expect_text}"
        elif not result.complete:
            result.error = "incomplete body"
    return result


async def run(plan: Plan, rounds: int, ramp: float, turns_per_session: int, together: bool = False) -> None:
    """Each client (one per path) starts at its place in the ramp and runs `rounds` streams back to back,
    starting a new session (`{n}` in its path) every `turns_per_session` streams.

    `together`: the clients run in lockstep instead, every one starting its next stream at the same
    moment once all of the round before have ended: bursts of simultaneous requests."""
    clients = len(plan.paths)

    def path(index: int, turn: int) -> str:
        return plan.paths[index].replace("{n}", str(turn // turns_per_session))

    if together:
        for turn in range(rounds):
            plan.results += await asyncio.gather(*(one_stream(plan, path(i, turn)) for i in range(clients)))
        return

    async def client(index: int) -> None:
        await asyncio.sleep(ramp * index / clients)
        for turn in range(rounds):
            plan.results.append(await one_stream(plan, path(index, turn)))

    await asyncio.gather(*(client(i) for i in range(clients)))


def summary(plan: Plan, wall: float) -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "streams": [
            [
                r.first - r.started if r.first else None,
                r.ended - r.started,
                r.error,
                r.started,
            ]
            for r in plan.results
        ],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.loadgen")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--path", required=True, help="path template; {i} is the client's index")
    parser.add_argument("--body", required=True)
    parser.add_argument("--header", action="append", default=[], help="'name: value', repeatable")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds over which clients start")
    parser.add_argument("--turns-per-session", type=int, default=10)
    parser.add_argument("--together", action="store_true", help="rounds in lockstep: bursts of clients")
    parser.add_argument("--sse", action="store_true")
    parser.add_argument("--expect-text", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--run-tag", default=str(os.getpid()))
    args = parser.parse_args(argv)
    plan = Plan(
        host=args.host,
        port=args.port,
        paths=[args.path.replace("{i}", str(i)).replace("{run}", args.run_tag) for i in range(args.clients)],
        body=args.body.encode(),
        headers=b"".join(h.encode() + b"\r\n" for h in args.header),
        sse=args.sse,
        expect_text=args.expect_text,
        timeout=args.timeout,
    )
    import uvloop  # comes with uvicorn[standard], as the workers' own loop

    started = time.perf_counter()
    uvloop.run(run(plan, args.rounds, args.ramp, args.turns_per_session, args.together))
    json.dump(summary(plan, time.perf_counter() - started), sys.stdout)


if __name__ == "__main__":
    main()
