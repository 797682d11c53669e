"""A TCP proxy in front of Redis that counts what a worker sends: commands, and round trips.

A round trip is a burst of commands the client sends before it waits for a reply: the proxy counts
one each time client bytes arrive after the server last spoke on that connection. Commands are the
top-level RESP arrays in the client's bytes. Commands that scripts run inside Redis are not on the
wire; `INFO commandstats` counts those (see `server_calls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import redis


class _Counts:
    def __init__(self) -> None:
        self.commands = 0
        self.round_trips = 0
        self.bytes_sent = 0  # by the clients, to Redis
        self.bytes_received = 0
        self.by_name: dict[str, int] = {}


class _Resp:
    """Counts the commands in a client's RESP stream, across reads."""

    def __init__(self, counts: _Counts) -> None:
        self.counts = counts
        self.buf = b""

    def feed(self, data: bytes) -> None:
        self.buf += data
        while True:
            parsed = self._command(self.buf)
            if parsed is None:
                return
            name, used = parsed
            self.buf = self.buf[used:]
            self.counts.commands += 1
            self.counts.by_name[name] = self.counts.by_name.get(name, 0) + 1

    @staticmethod
    def _command(buf: bytes) -> tuple[str, int] | None:
        if not buf.startswith(b"*"):
            if not buf:
                return None
            raise ValueError(f"not a RESP command: {buf[:40]!r}")
        end = buf.find(b"\r\n")
        if end < 0:
            return None
        items = int(buf[1:end])
        pos = end + 2
        name = ""
        for index in range(items):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            length = int(buf[pos + 1 : end])
            start = end + 2
            if len(buf) < start + length + 2:
                return None
            if index == 0:
                name = buf[start : start + length].decode().upper()
            pos = start + length + 2
        return name, pos


class RedisMeter:
    """Runs the proxy on its own thread and event loop; `url` is what the worker should use."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.counts = _Counts()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> RedisMeter:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            for writer in list(self._writers):
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def reset(self) -> None:
        self._loop.call_soon_threadsafe(self._reset)

    def snapshot(self) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            c = self.counts
            return {
                "commands": c.commands,
                "round_trips": c.round_trips,
                "bytes_sent": c.bytes_sent,
                "bytes_received": c.bytes_received,
                "by_name": dict(c.by_name),
            }

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(10)

    def _reset(self) -> None:
        self.counts = _Counts()

    async def _start(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._client, "127.0.0.1", 0)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers.update((writer, up_writer))
        # True once the server has answered: the client's next bytes start a new round trip.
        state = {"answered": True}
        parser = _Resp(self.counts)

        async def upstream() -> None:
            while data := await reader.read(65536):
                if state["answered"]:
                    self.counts.round_trips += 1
                    state["answered"] = False
                parser.counts = self.counts
                self.counts.bytes_sent += len(data)
                parser.feed(data)
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                state["answered"] = True
                self.counts.bytes_received += len(data)
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)
        self._writers.difference_update((writer, up_writer))


def server_calls(url: str) -> dict[str, int]:
    """Calls per command as Redis counts them, scripts' inner commands included."""
    return {name: int(value["calls"]) for name, value in server_stats(url)["commands"].items()}


def server_stats(url: str) -> dict[str, Any]:
    """What Redis says it spent: per command its calls and microseconds (`INFO commandstats`; a
    script's time includes the commands it ran, which are also counted under their own names), and
    the process's CPU seconds, user and system (`INFO cpu`: command time plus reading and writing
    sockets, expiry and its timers)."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
        cpu = client.info("cpu")
    finally:
        client.close()
    return {
        "commands": {
            name.removeprefix("cmdstat_").upper(): {"calls": int(v["calls"]), "usec": int(v["usec"])}
            for name, v in stats.items()
        },
        "cpu_seconds": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    }


def redis_cost(
    before: dict[str, Any], after: dict[str, Any], sent: dict[str, int], turns: int
) -> dict[str, Any]:
    """Redis's own time per turn, and the turns one Redis core could hold at that cost.

    Only commands the worker sent are summed: a script's microseconds already include its inner
    calls, which `INFO commandstats` also lists under their own names."""
    usec = sum(
        after["commands"].get(name, {}).get("usec", 0) - before["commands"].get(name, {}).get("usec", 0)
        for name in sent
    )
    cpu_usec = (after["cpu_seconds"] - before["cpu_seconds"]) * 1e6
    per_turn = usec / turns
    return {
        "usec_per_turn": per_turn,
        "turns_per_core": 1e6 / per_turn if per_turn > 0 else None,
        "process_cpu_usec_per_turn": cpu_usec / turns,
        "turns_per_core_process": 1e6 / (cpu_usec / turns) if cpu_usec > 0 else None,
    }
