"""The bench's results as a markdown table (with ratios and targets), JSON, and a PNG of the sweep."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Targets from the performance goals: (key, limit, True when higher is better). The goal on CPU per
# turn is a busy worker's, the figure that sets how long a burst of new turns waits for its first
# byte (50 of them at once wait about 50 times it). At one client the same turn costs more, since
# each of its steps runs alone through the event loop with nothing to share the iteration with; that
# figure is reported beside it, as what an idle worker spends.
GOALS = {
    "ttfb_c1_p50": (2.0, False),
    "cpu_turn_c50": (0.6, False),
    "max_streams": (1000, True),
    "cpu_per_1k": (0.15, False),
    "kib_per_stream": (20.0, False),
    "round_trips": (3, False),
    "commands": (8, False),
}


REDIS_ONLY = ("round_trips", "commands", "redis_usec", "redis_turns_per_core", "cluster_round_trips")


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 10):
        return f"{int(value):,}"
    return f"{value:.{digits}f}"


def _ratio(ours: float | None, other: float | None, higher_better: bool) -> str:
    """How many times better this service is than `other` (so > 1 is better either way)."""
    if ours is None or other is None or math.isnan(ours) or math.isnan(other):
        return "n/a"
    if higher_better:
        return _times(ours / other) if other > 0 else "n/a"
    return _times(other / ours) if ours > 0 else "∞"


def _times(ratio: float) -> str:
    # Below 1, two significant digits: a baseline far ahead still shows by how much.
    return f"{ratio:.1f}×" if ratio >= 1 else f"{ratio:.2g}×"


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: the value for each target, in display order."""
    t = results["targets"]
    floor, tutorial, service = t["floor"], t["tutorial"], t["service"]

    def added(name: str, clients: int, q: str) -> dict[str, float | None]:
        base = floor["first_byte"][str(clients)][q]
        return {
            "floor": 0.0,
            "tutorial": tutorial["first_byte"][str(clients)][q] - base,
            "service": service["first_byte"][str(clients)][q] - base,
            "one_shot": t["service_one_shot"]["first_byte"][str(clients)][q] - base,
            # The floor adds nothing by definition: against it, whole times are compared.
            "floor_whole": base,
            "service_whole": service["first_byte"][str(clients)][q],
        }

    def turn_cpu(clients: int) -> dict[str, float | None]:
        return {
            name: t[name]["first_byte"][str(clients)].get("cpu_ms_per_turn")
            for name in ("floor", "tutorial", "service")
        }

    def each(key: str) -> dict[str, float | None]:
        return {name: t[name].get(key) for name in ("floor", "tutorial", "service")}

    redis = results["redis"]
    table = [
        ("ttfb_c1_p50", "added time to first text byte, p50, 1 client (ms)", added("", 1, "p50_ms"), False),
        ("ttfb_c1_p99", "added time to first text byte, p99, 1 client (ms)", added("", 1, "p99_ms"), False),
        (
            "ttfb_c50_p50",
            "added time to first text byte, p50, 50 clients at once (ms)",
            added("", 50, "p50_ms"),
            False,
        ),
        (
            "ttfb_c50_p99",
            "added time to first text byte, p99, 50 clients at once (ms)",
            added("", 50, "p99_ms"),
            False,
        ),
        ("cpu_turn_c1", "worker CPU per turn, 1 client (ms)", turn_cpu(1), False),
        ("cpu_turn_c50", "worker CPU per turn, 50 clients at once (ms)", turn_cpu(50), False),
        (
            "max_streams",
            "concurrent streams one worker holds (p99 ≤ 1.25× duration, no errors)",
            each("max_streams"),
            True,
        ),
        (
            "cpu_per_1k",
            f"CPU-seconds per 1,000 deltas at {results['fixed_load']} streams",
            each("cpu_per_1k"),
            False,
        ),
        ("kib_per_stream", "memory per open stream (KiB)", each("kib_per_stream"), False),
        (
            "round_trips",
            "Redis round trips per committed turn",
            {"floor": 0, "tutorial": 0, "service": redis["round_trips"]},
            False,
        ),
        (
            "commands",
            "Redis commands per committed turn",
            {"floor": 0, "tutorial": 0, "service": redis["commands"]},
            False,
        ),
        (
            "redis_usec",
            "Redis time per committed turn (µs, INFO commandstats, scripts' inner calls included)",
            {"floor": 0, "tutorial": 0, "service": redis.get("usec_per_turn")},
            False,
        ),
        (
            "redis_turns_per_core",
            "committed turns per second one Redis core holds, at that time per turn",
            {"floor": None, "tutorial": None, "service": redis.get("turns_per_core")},
            True,
        ),
        (
            "cluster_round_trips",
            "Redis round trips per committed turn on a cluster (all nodes; those to different nodes go at once)",
            {"floor": 0, "tutorial": 0, "service": (results.get("redis_cluster") or {}).get("round_trips")},
            False,
        ),
    ]
    return [{"key": k, "label": label, "values": v, "higher_better": hb} for k, label, v, hb in table]


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| figure | floor: client → stand-in | tutorial's design | this service | vs floor | vs tutorial "
        "| goal | met |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for row in rows(results):
        v = row["values"]
        key = row["key"]
        if key in REDIS_ONLY:  # neither baseline uses Redis
            versus = versus_floor = ""
        elif key.startswith("ttfb"):
            versus = _ratio(v["service"], v["tutorial"], False)
            versus_floor = _ratio(v["service_whole"], v["floor_whole"], False)
        else:
            versus = _ratio(v["service"], v["tutorial"], row["higher_better"])
            versus_floor = _ratio(v["service"], v["floor"], row["higher_better"])
        goal, met = "", ""
        if key in GOALS:
            limit, higher = GOALS[key]
            value = v["service"]
            ok = value is not None and (value >= limit if higher else value <= limit)
            goal = f"{'≥' if higher else '≤'} {_fmt(limit)}"
            met = "yes" if ok else "**no**"
        lines.append(
            f"| {row['label']} | {_fmt(v['floor'])} | {_fmt(v['tutorial'])} | {_fmt(v['service'])} "
            f"| {versus_floor} | {versus} | {goal} | {met} |"
        )
    one_shot = results["targets"]["service_one_shot"]["first_byte"]
    floor = results["targets"]["floor"]["first_byte"]
    lines += [
        "",
        "Ratios say how many times better this service is than a baseline: above 1 better, below 1 "
        "worse. The floor is what the stand-in costs alone, so against it every ratio is below 1; its "
        "first-byte ratios compare whole times, since the floor adds nothing to its own.",
        "",
        f"Floor, absolute: first text byte p50 {_fmt(floor['1']['p50_ms'])} ms at 1 client, "
        f"{_fmt(floor['50']['p50_ms'])} ms at 50. A one-shot turn (`/chat/stream`, no session) adds "
        f"{_fmt(one_shot['1']['p50_ms'] - floor['1']['p50_ms'])} ms at p50, 1 client.",
    ]
    redis = results["redis"]
    if redis.get("process_cpu_usec_per_turn") is not None:
        process = redis["turns_per_core_process"]
        lines += [
            "",
            f"Redis's whole process (INFO cpu: commands, sockets, timers) spent "
            f"{_fmt(redis['process_cpu_usec_per_turn'])} µs of CPU per committed turn, "
            f"{_fmt(process) if process else 'n/a'} turns per second per core. Shard when a Redis's "
            "CPU nears one core: turns/s ÷ that figure is how many primaries a cluster needs.",
        ]
    lines += [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = {"floor": "floor (stand-in direct)", "tutorial": "tutorial's design", "service": "this service"}
    for name, label in names.items():
        sweep = results["targets"][name]["sweep"]
        xs = [r["streams"] for r in sweep]
        left.plot(xs, [r["inflation_p99"] for r in sweep], marker="o", label=label)
        right.plot(xs, [r["worker_cpu_per_1k_deltas"] for r in sweep], marker="o", label=label)
    left.axhline(results["limit"], color="grey", linestyle="--", linewidth=1)
    left.set(
        xlabel="concurrent streams", ylabel="p99 stream duration ÷ upstream's", title="Duration inflation"
    )
    left.set_ylim(0.95, max(2.0, results["limit"] + 0.25))
    right.set(xlabel="concurrent streams", ylabel="CPU-seconds per 1,000 deltas", title="Cost per delta")
    right.set_ylim(bottom=0)
    for axis in (left, right):
        axis.set_xscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(results["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
