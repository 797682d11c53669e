"""What resumable replies cost: one worker per `CHAT_REPLY_LOG` mode, at the same load, in one run.

    off         no reply is ever written for readers (the resume GET answers 204)
    on_demand   the default: a reply is written once a reader asks; here none does
    always      every reply is written, coalesced, from its first text: what a turn pays while
                a reader follows it

Worker CPU per 1,000 deltas at `fixed` concurrent streams, each mode measured twice, interleaved,
so that drift on the machine falls on all of them alike; then Redis commands, round trips and bytes
per committed turn for each, through the metering proxy.
`python -m tests.bench.resume [--quick]` runs this phase alone and prints its table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.bench import measure
from tests.bench.measure import Load, Others, Shape, Target
from tests.bench.redis_meter import RedisMeter, server_stats
from tests.bench.targets import Cores, Process, redis_for_bench, service_worker, standin

MODES = ("off", "on_demand", "always")
GOAL = 1.10  # on_demand may cost at most this much worker CPU per delta against off
# The Redis phase's shape: deltas close together, as Claude sends them, so that coalescing shows.
REDIS_SHAPE = Shape(deltas=60, delay=0.005)


def worker(cores: Cores, logs: Path, redis_url: str, upstream: str, mode: str, name: str) -> Process:
    process = service_worker(cores, logs, redis_url, upstream, name=name)
    process.env["CHAT_REPLY_LOG"] = mode
    return process


def resume_phase(
    load: Load,
    cores: Cores,
    logs: Path,
    redis_url: str,
    upstream: str,
    shape: Shape,
    fixed: int,
    others: Others,
    quick: bool,
    log: Any,
) -> dict[str, Any]:
    workers = {mode: worker(cores, logs, redis_url, upstream, mode, f"resume-{mode}") for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    errors: dict[str, int] = dict.fromkeys(MODES, 0)
    try:
        for process in workers.values():
            process.start()
        targets = {
            mode: Target(f"resume_{mode}", workers[mode], f"/chat/r{mode}{{run}}-{{i}}-{{n}}/stream")
            for mode in MODES
        }
        for target in targets.values():
            load.run(target, Shape(deltas=5, delay=0.0), clients=10, rounds=2, ramp=0.0, timeout=30)
        for attempt in range(1 if quick else 2):
            for mode in MODES:
                result = measure.level(
                    load,
                    targets[mode],
                    shape,
                    fixed,
                    others,
                    ramp=shape.nominal_seconds,
                    rounds=1 if quick else 2,
                )
                cpu[mode].append(result["worker_cpu_per_1k_deltas"])
                errors[mode] += result["errors"]
                log(
                    f"  resume {mode:>9} {fixed} streams (run {attempt + 1}): "
                    f"{result['worker_cpu_per_1k_deltas']:.3f} CPU-s per 1,000 deltas, {result['errors']} errors"
                )
    finally:
        for process in workers.values():
            process.stop()
    redis_figures: dict[str, Any] = {}
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    for mode in MODES:
        with RedisMeter(host, int(port)) as meter:
            metered = worker(cores, logs, meter.url, upstream, mode, f"resume-{mode}-metered")
            metered.start()
            try:
                target = Target(f"resume_{mode}", metered, f"/chat/rm{mode}{{run}}-{{i}}-{{n}}/stream")
                redis_figures[mode] = measure.redis_per_turn(
                    load, target, meter, server_stats, redis_url, turns=10 if quick else 40, shape=REDIS_SHAPE
                )
            finally:
                metered.stop()
    cpu_mean = {mode: statistics.fmean(values) for mode, values in cpu.items()}
    return {
        "streams": fixed,
        "shape": {"deltas": shape.deltas, "delay": shape.delay},
        "redis_shape": {"deltas": REDIS_SHAPE.deltas, "delay": REDIS_SHAPE.delay},
        "cpu_per_1k": cpu_mean,
        "cpu_runs": cpu,
        "errors": errors,
        "on_demand_vs_off": cpu_mean["on_demand"] / cpu_mean["off"],
        "always_vs_off": cpu_mean["always"] / cpu_mean["off"],
        "goal": GOAL,
        "redis": redis_figures,
    }


def markdown(result: dict[str, Any]) -> str:
    cpu, redis = result["cpu_per_1k"], result["redis"]
    base = cpu["off"]
    lines = [
        f"Resumable replies at {result['streams']} streams ({result['shape']['deltas']} deltas, "
        f"{result['shape']['delay']} s apart); Redis per turn of {result['redis_shape']['deltas']} deltas "
        f"{result['redis_shape']['delay']} s apart.",
        "",
        "| CHAT_REPLY_LOG | worker CPU-s per 1,000 deltas | vs off | Redis commands per turn "
        "| round trips per turn | bytes sent per turn | bytes received per turn |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        r = redis[mode]
        lines.append(
            f"| {mode} | {cpu[mode]:.3f} | {cpu[mode] / base:.2f}x | {r['commands']:.1f} | "
            f"{r['round_trips']:.1f} | {r['bytes_sent']:.0f} | {r['bytes_received']:.0f} |"
        )
    verdict = "within" if result["on_demand_vs_off"] <= result["goal"] else "OVER"
    lines += [
        "",
        f"on_demand against off: {result['on_demand_vs_off']:.3f}x worker CPU per delta, {verdict} the "
        f"goal of {result['goal']:.2f}x.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.resume", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="where resume.json/.md go")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cores = Cores.split()
    load = Load(cores)
    shape = Shape(deltas=5, delay=0.1) if args.quick else Shape(deltas=30, delay=0.1)
    fixed = 20 if args.quick else 200

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with (
        tempfile.TemporaryDirectory(prefix="chat-api-bench-") as work,
        redis_for_bench(cores, Path(work)) as redis,
    ):
        model = standin(cores, Path(work))
        model.start()
        try:
            others = Others([model.pid] + ([redis.pid] if redis.pid else []))
            result = resume_phase(
                load, cores, Path(work), redis.url, model.url, shape, fixed, others, args.quick, log
            )
        finally:
            model.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "resume.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "resume.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
