"""The bench's measurements, one function each, against a target that is already running.

A target is what the load generator talks to: the stand-in itself (the floor), the tutorial's design,
or this service. Each phase runs the load generator as a process of its own on the load cores and
reads the CPU and memory of the processes involved from /proc around it.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.bench.redis_meter import redis_cost
from tests.bench.targets import Cores, Process, cpu_seconds

MODEL = "claude-sonnet-4-6"


@dataclass(frozen=True, slots=True)
class Shape:
    """What each stream asks the stand-in for."""

    deltas: int
    delay: float

    @property
    def directives(self) -> str:
        return f"@@deltas={self.deltas} @@delay={self.delay}"

    @property
    def text_bytes(self) -> int:
        return sum(len(f"w{i} ") for i in range(self.deltas))

    @property
    def nominal_seconds(self) -> float:
        return self.deltas * self.delay


@dataclass(slots=True)
class Target:
    name: str
    process: Process  # the one whose CPU and memory count: the worker, or for the floor the stand-in
    path: str  # `{i}` client, `{n}` session, `{run}` load-generator run
    sse: bool = False
    headers: list[str] = field(default_factory=list)

    def body(self, shape: Shape) -> str:
        message = f"bench {shape.directives}"
        if self.sse:
            return orjson.dumps(
                {
                    "model": MODEL,
                    "max_tokens": 1024,
                    "stream": True,
                    "messages": [{"role": "user", "content": message}],
                }
            ).decode()
        return orjson.dumps({"message": message}).decode()


@dataclass(slots=True)
class LoadRun:
    wall: float
    cpu: float  # the load generator's own
    streams: list[list[Any]]  # [seconds to first text, seconds to end, error, start]

    @property
    def ok(self) -> list[list[Any]]:
        return [s for s in self.streams if not s[2]]

    @property
    def errors(self) -> list[str]:
        return [s[2] for s in self.streams if s[2]]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Load:
    """Runs the load generator against targets, pinned to the load cores."""

    def __init__(self, cores: Cores) -> None:
        self.cores = cores

    def command(
        self,
        target: Target,
        shape: Shape,
        *,
        clients: int,
        rounds: int,
        ramp: float,
        timeout: float,
        together: bool = False,
    ) -> list[str]:
        args = [
            sys.executable, "-m", "tests.bench.loadgen",
            "--port", str(target.process.port),
            "--path", target.path,
            "--body", target.body(shape),
            "--clients", str(clients),
            "--rounds", str(rounds),
            "--ramp", str(ramp),
            "--timeout", str(timeout),
        ]  # fmt: skip
        if together:
            args.append("--together")
        if target.sse:
            args.append("--sse")
        else:
            args += ["--expect-text", str(shape.text_bytes)]
        for header in target.headers:
            args += ["--header", header]
        return args

    def start(self, target: Target, shape: Shape, **kwargs: Any) -> subprocess.Popen[bytes]:
        cores = self.cores.load
        return subprocess.Popen(
            self.command(target, shape, **kwargs),
            stdout=subprocess.PIPE,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores is not None else None,
        )

    @staticmethod
    def finish(proc: subprocess.Popen[bytes], timeout: float) -> LoadRun:
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"the load generator failed with {proc.returncode}")
        data = json.loads(out)
        return LoadRun(data["wall"], data["cpu"], data["streams"])

    def run(self, target: Target, shape: Shape, **kwargs: Any) -> LoadRun:
        kwargs.setdefault("timeout", shape.nominal_seconds * 4 + 30)
        proc = self.start(target, shape, **kwargs)
        return self.finish(proc, timeout=kwargs["timeout"] * (kwargs["rounds"] + 1) + kwargs["ramp"] + 30)


def first_byte(load: Load, target: Target, *, clients: int, requests: int) -> dict[str, Any]:
    """Seconds to the first byte of reply text, and the worker's CPU per turn: short replies with no
    delay, so only the path counts. One client sends its requests back to back; several start each
    round together, as a burst, and the next burst once the last one ended."""
    shape = Shape(deltas=3, delay=0.0)
    rounds = max(1, requests // clients)
    before = target.process.cpu()
    run = load.run(target, shape, clients=clients, rounds=rounds, ramp=0.0, timeout=30, together=clients > 1)
    cpu = target.process.cpu() - before
    times = [s[0] for s in run.ok if s[0] is not None]
    return {
        "clients": clients,
        "requests": len(run.streams),
        "errors": len(run.errors),
        "p50_ms": percentile(times, 50) * 1000,
        "p99_ms": percentile(times, 99) * 1000,
        # The worker's CPU over every request of the run: accepting the connection, admission, the
        # lock and history, the upstream request, three short deltas, the commit and the log line.
        "cpu_ms_per_turn": cpu / len(run.streams) * 1000 if run.streams else float("nan"),
    }


@dataclass(slots=True)
class Others:
    """The processes on the load cores, whose CPU tells whether they were the bottleneck."""

    pids: list[int]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)


def level(
    load: Load, target: Target, shape: Shape, streams: int, others: Others, ramp: float, rounds: int
) -> dict[str, Any]:
    """`streams` concurrent streams, held for `rounds` stream lengths after a ramp of one length."""
    worker_before, others_before = target.process.cpu(), others.cpu()
    run = load.run(target, shape, clients=streams, rounds=rounds, ramp=ramp)
    worker_cpu = target.process.cpu() - worker_before
    load_cpu = others.cpu() - others_before + run.cpu
    ok = run.ok
    inflation = [s[1] / shape.nominal_seconds for s in ok]
    deltas = len(ok) * shape.deltas
    load_cores = len(load.cores.load) if load.cores.load is not None else os.cpu_count() or 1
    errors = run.errors
    return {
        "streams": streams,
        "completed": len(ok),
        "errors": len(errors),
        "error_sample": sorted(set(errors))[:3],
        "inflation_p50": percentile(inflation, 50),
        "inflation_p99": percentile(inflation, 99),
        "ttft_p99_ms": percentile([s[0] for s in ok if s[0] is not None], 99) * 1000,
        "worker_cpu_per_1k_deltas": worker_cpu / deltas * 1000 if deltas else float("nan"),
        "worker_utilisation": worker_cpu / run.wall,
        "load_utilisation": load_cpu / run.wall / load_cores,
    }


def sweep(
    load: Load,
    target: Target,
    shape: Shape,
    levels: list[int],
    others: Others,
    *,
    limit: float,
    rounds: int,
    must_reach: int,
    log: Any,
) -> list[dict[str, Any]]:
    """Levels in order until one fails once `must_reach` is passed; one failure below it is retried."""
    results: list[dict[str, Any]] = []
    for streams in levels:
        result = level(load, target, shape, streams, others, ramp=shape.nominal_seconds, rounds=rounds)
        result["held"] = result["errors"] == 0 and result["inflation_p99"] <= limit
        results.append(result)
        log(
            f"  {target.name:>9} {streams:5d} streams: p99 inflation {result['inflation_p99']:.3f}, "
            f"{result['errors']} errors, worker {result['worker_utilisation']:.0%} of a core, "
            f"load side {result['load_utilisation']:.0%}"
        )
        if not result["held"] and streams >= must_reach:
            break
        time.sleep(0.5)  # let closing connections settle before the next level
    return results


def most_held(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest level held, counting only levels below the first that was not."""
    best = None
    for result in results:
        if not result["held"]:
            break
        best = result
    return best


def memory_per_stream(load: Load, target: Target, streams: int, *, seconds: float = 10.0) -> dict[str, Any]:
    """Resident memory each further open stream costs: the slope between `streams / 2` open streams and
    `streams`, both groups open at once, so that nothing one-off (the first connections, buffers a
    process keeps once it has grown) counts as the streams' own.

    Each reading waits until the process holds a socket for every stream of the group and its count
    of sockets has settled, rather than a fixed time: on a busy machine the streams open late, and a
    reading taken before they did would count them as free."""
    ramp = seconds / 5
    first = streams // 2
    # The first group outlives the second's ramp and reading; the second outlives its own reading.
    long = Shape(deltas=int(seconds * 6), delay=0.5)
    short = Shape(deltas=int(seconds * 3), delay=0.5)
    pid = target.process.pid
    base = open_sockets(pid)
    before = target.process.rss()
    group1 = load.start(target, long, clients=first, rounds=1, ramp=ramp, timeout=120)
    opened_first = _settle(pid, base + first, deadline=ramp + seconds)
    with_first = target.process.rss()
    group2 = load.start(target, short, clients=streams - first, rounds=1, ramp=ramp, timeout=120)
    opened_all = _settle(pid, opened_first + streams - first, deadline=ramp + seconds)
    with_all = target.process.rss()
    runs = [load.finish(group2, timeout=150), load.finish(group1, timeout=150)]
    return {
        "streams": streams,
        "sockets": [base, opened_first, opened_all],
        "rss_before_mib": before / 2**20,
        "rss_half_open_mib": with_first / 2**20,
        "rss_all_open_mib": with_all / 2**20,
        "kib_per_stream": (with_all - with_first) / (streams - first) / 1024,
        "errors": sum(len(run.errors) for run in runs),
    }


def open_sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


def _settle(pid: int, at_least: int, *, deadline: float) -> int:
    """Wait until `pid` holds `at_least` sockets and has opened no more for a second (or the
    deadline passed); how many it holds then."""
    end = time.monotonic() + deadline
    last, since = open_sockets(pid), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.2)
        now = open_sockets(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif now >= at_least and time.monotonic() - since >= 1.0:
            break
    return last


def redis_per_turn(
    load: Load,
    target: Target,
    meter: Any,
    server_stats: Any,
    url: str,
    *,
    turns: int,
    shape: Shape = Shape(deltas=5, delay=0.0),
) -> dict[str, Any]:
    """Commands, round trips and bytes on the wire per committed turn, the commands Redis ran for
    them, and what they cost Redis (see `redis_meter.redis_cost`)."""
    load.run(target, shape, clients=2, rounds=3, ramp=0.0, timeout=30)  # connections made, scripts loaded
    meter.reset()
    stats_before = server_stats(url)
    run = load.run(target, shape, clients=1, rounds=turns, ramp=0.0, timeout=30)
    counts = meter.snapshot()
    stats_after = server_stats(url)
    calls_before = {name: v["calls"] for name, v in stats_before["commands"].items()}
    calls_after = {name: v["calls"] for name, v in stats_after["commands"].items()}
    committed = len(run.ok)
    inner = {
        name: calls_after.get(name, 0) - calls_before.get(name, 0)
        for name in calls_after
        if calls_after.get(name, 0) != calls_before.get(name, 0) and name != "INFO"
    }
    return {
        "turns": committed,
        "errors": len(run.errors),
        "round_trips": counts["round_trips"] / committed,
        "commands": counts["commands"] / committed,
        "bytes_sent": counts.get("bytes_sent", 0) / committed,
        "bytes_received": counts.get("bytes_received", 0) / committed,
        "by_name": {name: n / committed for name, n in sorted(counts["by_name"].items())},
        "server_calls": sum(inner.values()) / committed,
        "server_by_name": {name: n / committed for name, n in sorted(inner.items())},
        **redis_cost(stats_before, stats_after, counts["by_name"], committed),
    }


def cluster_round_trips(load: Load, target: Target, meters: list[Any], *, turns: int) -> dict[str, Any]:
    """Round trips per committed turn on a cluster, summed over its nodes (those to different nodes
    go at once), and on how many nodes a turn's round trips landed."""
    shape = Shape(deltas=5, delay=0.0)
    # As many clients as below, so that every connection the measured turns use is already made.
    load.run(target, shape, clients=turns, rounds=2, ramp=0.0, timeout=30)
    for meter in meters:
        meter.reset()
    # A session per client, one turn each: the sessions' slots spread over the nodes as a deployment's do.
    run = load.run(target, shape, clients=turns, rounds=1, ramp=0.0, timeout=30)
    counts = [meter.snapshot() for meter in meters]
    committed = len(run.ok)
    return {
        "turns": committed,
        "errors": len(run.errors),
        "nodes": len(meters),
        "round_trips": sum(c["round_trips"] for c in counts) / committed,
        "commands": sum(c["commands"] for c in counts) / committed,
        "round_trips_by_node": [c["round_trips"] / committed for c in counts],
        "by_name": {
            name: sum(c["by_name"].get(name, 0) for c in counts) / committed
            for name in sorted({name for c in counts for name in c["by_name"]})
        },
    }


def summarise(times: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(times), "p50": percentile(times, 50), "p99": percentile(times, 99)}
