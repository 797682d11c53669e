"""`python -m tests.bench`: this service against the floor, the tutorial's design, the idiomatic async
design and itself with each hand-written part swapped for its library (the ablation), in one run.

Everything runs on loopback: a stand-in model, Redis, one worker of each design on a core of its own,
and the load generator. Figures are printed as a markdown table and written, with the sweep's raw
data, to `<out>/results.json`, `<out>/results.md` and `<out>/sweep.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.bench import ablation, measure, report, resume
from tests.bench.measure import Load, Others, Shape, Target
from tests.bench.redis_meter import RedisMeter, server_stats
from tests.bench.targets import (
    Cores,
    Process,
    idiomatic_worker,
    redis_for_bench,
    service_worker,
    standin,
    tutorial_worker,
)
from tests.processes import wait_until

LEVELS = [50, 100, 200, 300, 500, 750, 1000, 1250, 1500, 2000]
LIMIT = 1.25  # a stream is on time while it lasts at most this many times the upstream's own duration
FIXED_LOAD = 200  # concurrent streams at which CPU per delta is compared


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {len(Cores.split().worker or [0]) + len(Cores.split().load or [])} cores, Linux {platform.release()}, Python {platform.python_version()}"


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[None]:
    try:
        for process in processes:
            process.start()
        yield
    finally:
        for process in reversed(processes):
            process.stop()


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that every process the bench started is stopped by PID


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _stop)
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="where results go")
    parser.add_argument("--quick", action="store_true", help="a small run that checks the bench works")
    parser.add_argument("--levels", help="comma-separated concurrency levels for the sweep")
    parser.add_argument(
        "--turns",
        action="store_true",
        help="only what a turn costs: first byte and worker CPU per turn, the floor against this service",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="with --turns: a checkout of another version (e.g. a `git worktree`), measured alongside",
    )
    parser.add_argument(
        "--repeats", type=int, help="rounds over every arm, interleaved (default 2; 1 with --quick)"
    )
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    quick = args.quick
    levels = [int(x) for x in args.levels.split(",")] if args.levels else ([10, 20] if quick else LEVELS)
    fixed = min(FIXED_LOAD, levels[-1]) if quick else FIXED_LOAD
    repeats = args.repeats or (1 if quick else 2)
    shape = Shape(deltas=5, delay=0.1) if quick else Shape(deltas=30, delay=0.1)
    cores = Cores.split()
    notes = [f"Pinning: {cores.describe()}."]
    if not cores.pinned:
        notes.append("Only one core: the worker shares it with the load generator and the stand-in.")
    results: dict[str, Any] = {
        "machine": machine(),
        "shape": {"deltas": shape.deltas, "delay": shape.delay},
        "limit": LIMIT,
        "fixed_load": fixed,
        "quick": quick,
        "targets": {},
        "ablation": {},
        "repeats": repeats,
        "notes": notes,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    load = Load(cores)
    if args.turns:
        turns_only(load, cores, repeats, log, args.baseline)
        return
    with (
        tempfile.TemporaryDirectory(prefix="chat-api-bench-") as work,
        redis_for_bench(cores, Path(work)) as redis,
    ):
        logs = Path(work)
        model = standin(cores, logs)
        with running(model):
            arms = {
                arm.name: service_worker(cores, logs, redis.url, model.url, name=arm.name, extra=arm.env)
                for arm in ablation.ARMS
            }
            service = arms["service"]
            tutorial = tutorial_worker(cores, logs, model.url)
            idiomatic = idiomatic_worker(cores, logs, redis.url, model.url)
            others = Others([model.pid] + ([redis.pid] if redis.pid else []))
            auth = ["authorization: Bearer bench-key", "anthropic-version: 2023-06-01"]
            targets = [
                Target("floor", model, "/v1/messages", sse=True, headers=auth),
                Target("tutorial", tutorial, "/chat/t{run}-{i}-{n}/stream"),
                Target("idiomatic", idiomatic, "/chat/i{run}-{i}-{n}/stream"),
                *(
                    Target(name, worker, f"/chat/{name}-{{run}}-{{i}}-{{n}}/stream")
                    for name, worker in arms.items()
                ),
            ]
            one_shot = Target("service_one_shot", service, "/chat/stream")
            with running(*arms.values(), tutorial, idiomatic):
                for repeat in range(repeats):
                    log(f"repeat {repeat + 1} of {repeats}")
                    # Each repeat starts one arm further on, so that no arm always runs first or last.
                    shift = repeat % len(targets)
                    for target in targets[shift:] + targets[:shift]:
                        figures = run_target(
                            load, target, shape, levels, fixed, others, quick, log,
                            # The floor's own "worker" is the stand-in, on the load cores with the rest.
                            others=Others([redis.pid] if redis.pid else []) if target.name == "floor" else others,
                        )  # fmt: skip
                        earlier = results["targets"].get(target.name)
                        if earlier is not None:
                            # Memory is read in the first repeat only: a process keeps what its first
                            # sweep grew to, so later streams reuse it and would read as free.
                            figures["memory"], figures["kib_per_stream"] = (
                                earlier["memory"],
                                earlier["kib_per_stream"],
                            )
                        results["targets"][target.name] = figures
                        results["ablation"].setdefault(target.name, []).append(
                            ablation.summary(figures, repeat)
                        )
                    # What is measured so far, should the run be cut short.
                    args.out.mkdir(parents=True, exist_ok=True)
                    (args.out / "partial.json").write_text(json.dumps(results, indent=2) + "\n")
                log("one-shot turns")
                results["targets"]["service_one_shot"] = {
                    "first_byte": first_bytes(load, one_shot, quick),
                }
            log("Redis per turn")
            results["redis"] = redis_phase(load, cores, logs, redis.url, model.url, quick)
            log("Redis Cluster round trips per turn")
            results["redis_cluster"] = cluster_phase(load, cores, logs, model.url, quick, notes)
            log("resumable replies: off, on demand, always")
            results["resume"] = resume.resume_phase(
                load, cores, logs, redis.url, model.url, shape, fixed, others, quick, log
            )
        check_load_side(results, notes)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "partial.json").unlink(missing_ok=True)
    table = (
        report.markdown(results)
        + "\n"
        + ablation.markdown(results)
        + "\n"
        + resume.markdown(results["resume"])
    )
    (args.out / "results.md").write_text(table)
    report.plot(results, args.out / "sweep.png")
    print(table)
    log(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'sweep.png'}")


def turns_only(load: Load, cores: Cores, repeats: int, log: Any, baseline: Path | None = None) -> None:
    """The floor and this service, alternating: time to the first byte and the worker's CPU per turn,
    at 1 client and at 50 at once. With `baseline`, a checkout of another version of this code, its
    worker is measured in the same rounds: two versions compared back to back, on one machine state."""
    names = ["floor", "service"] + (["baseline"] if baseline is not None else [])
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with (
        tempfile.TemporaryDirectory(prefix="chat-api-bench-") as work,
        redis_for_bench(cores, Path(work)) as redis,
    ):
        model = standin(cores, Path(work))
        workers = [service_worker(cores, Path(work), redis.url, model.url)]
        if baseline is not None:
            # Its own `api` package first on the path (-P: not this checkout's, from the working directory).
            other = service_worker(
                cores, Path(work), redis.url, model.url, name="baseline", extra={"PYTHONPATH": str(baseline)}
            )
            other.args = [sys.executable, "-P", "-m", "api", "serve"]
            workers.append(other)
        auth = ["authorization: Bearer bench-key", "anthropic-version: 2023-06-01"]
        targets = [Target("floor", model, "/v1/messages", sse=True, headers=auth)] + [
            Target(worker.name, worker, f"/chat/{worker.name[0]}{{run}}-{{i}}-{{n}}/stream")
            for worker in workers
        ]
        with running(model, *workers):
            for target in targets[1:]:
                load.run(target, Shape(deltas=5, delay=0.0), clients=10, rounds=2, ramp=0.0, timeout=30)
            for repeat in range(repeats):
                shift = repeat % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    log(f"repeat {repeat + 1}: {target.name}")
                    rows[target.name].append(first_bytes(load, target, False))
    print(
        "| repeat | clients | worker | first byte p50 / p99 (ms) | added to the floor's p50 / p99 (ms) "
        "| CPU per turn (ms) |"
    )
    print("|---:|---:|---|---:|---:|---:|")
    for repeat in range(repeats):
        for clients in ("1", "50"):
            floor = rows["floor"][repeat][clients]
            for name in names:
                r = rows[name][repeat][clients]
                added = (
                    f"{r['p50_ms'] - floor['p50_ms']:.2f} / {r['p99_ms'] - floor['p99_ms']:.2f}"
                    if name != "floor"
                    else ""
                )
                print(
                    f"| {repeat + 1} | {clients} | {name} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {added} "
                    f"| {r['cpu_ms_per_turn']:.3f} |"
                )


def first_bytes(load: Load, target: Target, quick: bool) -> dict[str, Any]:
    return {
        "1": measure.first_byte(load, target, clients=1, requests=10 if quick else 300),
        "50": measure.first_byte(load, target, clients=50, requests=50 if quick else 1500),
    }


def run_target(
    load: Load,
    target: Target,
    shape: Shape,
    levels: list[int],
    fixed: int,
    _others: Others,
    quick: bool,
    log: Any,
    *,
    others: Others,
) -> dict[str, Any]:
    log(f"{target.name}: warm-up")
    load.run(target, Shape(deltas=5, delay=0.0), clients=10, rounds=2, ramp=0.0, timeout=30)
    # Memory first, while the process has not yet grown to the sweep's peak and kept it.
    memory = measure.memory_per_stream(load, target, 50 if quick else 500, seconds=1.0 if quick else 10.0)
    log(f"{target.name}: {memory['kib_per_stream']:.1f} KiB per open stream; first byte")
    first = first_bytes(load, target, quick)
    log(f"{target.name}: sweep")
    sweep = measure.sweep(
        load, target, shape, levels, others, limit=LIMIT, rounds=1 if quick else 2, must_reach=fixed, log=log
    )
    best = measure.most_held(sweep)
    at_fixed = next((r for r in sweep if r["streams"] == fixed), None)
    return {
        "memory": memory,
        "kib_per_stream": memory["kib_per_stream"],
        "first_byte": first,
        "sweep": sweep,
        "max_streams": best["streams"] if best else 0,
        "cpu_per_1k": at_fixed["worker_cpu_per_1k_deltas"] if at_fixed else None,
    }


def redis_phase(
    load: Load, cores: Cores, logs: Path, redis_url: str, upstream: str, quick: bool
) -> dict[str, Any]:
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    with RedisMeter(host, int(port)) as meter:
        worker = service_worker(cores, logs, meter.url, upstream, name="service-metered")
        with running(worker):
            target = Target("service", worker, "/chat/m{run}-{i}-{n}/stream")
            return measure.redis_per_turn(
                load, target, meter, server_stats, redis_url, turns=10 if quick else 40
            )


def cluster_phase(
    load: Load, cores: Cores, logs: Path, upstream: str, quick: bool, notes: list[str]
) -> dict[str, Any] | None:
    """A cluster of three primaries, each behind a meter it announces as its own address, so that the
    worker's cluster client (which connects wherever CLUSTER SLOTS points) goes through them."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        notes.append("Redis Cluster: not measured, redis-server and redis-cli are not installed.")
        return None
    from tests.topologies import Cluster

    cluster = Cluster(logs / "cluster", size=3, replicas=0)
    cluster.start()
    try:
        with contextlib.ExitStack() as stack:
            meters = [stack.enter_context(RedisMeter("127.0.0.1", node.port)) for node in cluster.nodes]
            for node, meter in zip(cluster.nodes, meters, strict=True):
                with node.client() as client:
                    client.config_set("cluster-announce-bus-port", node.port + 10000)
                    client.config_set("cluster-announce-port", meter.port)

            def announced() -> bool:
                with cluster.nodes[0].client() as client:
                    ports = {
                        int(primary[1]) for _, _, primary, *_ in client.execute_command("CLUSTER", "SLOTS")
                    }
                return ports == {meter.port for meter in meters}

            wait_until(announced, 10, "every node to announce its meter")
            worker = service_worker(
                cores, logs, meters[0].url.removesuffix("/0"), upstream, name="service-cluster"
            )
            worker.env["CHAT_REDIS_MODE"] = "cluster"
            with running(worker):
                target = Target("service", worker, "/chat/c{run}-{i}-{n}/stream")
                return measure.cluster_round_trips(load, target, meters, turns=10 if quick else 40)
    finally:
        cluster.stop()


def check_load_side(results: dict[str, Any], notes: list[str]) -> None:
    """Say whether the stand-in, Redis and the load generator kept up where the figures come from."""
    for name in ("tutorial", "service"):
        target = results["targets"][name]
        for result in target["sweep"]:
            if result["streams"] > target["max_streams"] and result is not target["sweep"][-1]:
                continue
            busy = result["load_utilisation"]
            if busy > 0.85 and result["streams"] <= max(target["max_streams"], 1) * 1.5:
                notes.append(
                    f"{name} at {result['streams']} streams: the load side was {busy:.0%} busy, so it may "
                    "have been the bottleneck; that figure is a lower bound."
                )
        best = next((r for r in target["sweep"] if r["streams"] == target["max_streams"]), None)
        if best is not None:
            notes.append(
                f"{name} at its most ({best['streams']} streams): worker {best['worker_utilisation']:.0%} of "
                f"its core, load side {best['load_utilisation']:.0%} of its core(s), "
                f"{best['worker_cpu_per_1k_deltas']:.3f} CPU-s per 1,000 deltas."
            )
    floor = results["targets"]["floor"]
    notes.append(
        f"Floor: the stand-in held {floor['max_streams']} streams on time "
        f"(of {floor['sweep'][-1]['streams']} tried) on the load core(s)."
    )
