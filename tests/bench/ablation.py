"""The ablation: this service against itself with each hand-written part swapped for the library it
replaces, and against the idiomatic async design, each arm measured in turn in every repeat.

A part stays only where, in every repeat, it makes at least one of three figures at least `RULE`
better than the arm without it: CPU per delta at the fixed load, concurrent streams held, memory per
open stream. Repeats are paired (the arms of one repeat ran minutes apart, on the same machine in the
same state), so a gain is computed within a repeat and its worst case across repeats decides.
Memory per stream is read in the first repeat only, on processes that have not grown yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

RULE = 0.15


@dataclass(frozen=True, slots=True)
class Arm:
    name: str
    label: str
    env: dict[str, str]
    part: str | None = None  # the hand-written part this arm replaces, if any


# Each arm but the service drops exactly one part (its setting is in docs/hand-written-parts.md). The
# service arm turns every part on, whatever the defaults, so that each is measured against its library.
ARMS = [
    Arm(
        "service",
        "this service, every part",
        {"CHAT_HTTP_PROTOCOL": "chat", "CHAT_FAST_PATH": "true", "CHAT_REDIS_SHARED_CONNECTION": "true"},
    ),
    Arm(
        "stock_transport",
        "the SDK's stock transport",
        {"CHAT_UPSTREAM_TRANSPORT": "httpx"},
        "api/upstream/transport.py",
    ),
    Arm("fastapi_routing", "FastAPI routing", {"CHAT_FAST_PATH": "false"}, "api/http/app.py ChatAPI"),
    Arm(
        "sdk_requests",
        "the SDK building every request",
        {"CHAT_UPSTREAM_CLIENT": "sdk"},
        "api/upstream/direct.py",
    ),
    Arm(
        "redis_pool",
        "redis-py's pool for a turn's script calls",
        {"CHAT_REDIS_SHARED_CONNECTION": "false"},
        "api/store/multiplex.py",
    ),
    Arm(
        "stock_protocol",
        "uvicorn's stock httptools protocol",
        {"CHAT_HTTP_PROTOCOL": "httptools"},
        "api/http/protocol.py",
    ),
]

# (key, label, True when higher is better)
FIGURES = [
    ("cpu_per_1k", "CPU-s per 1,000 deltas at {fixed} streams", False),
    ("max_streams", "concurrent streams held", True),
    ("kib_per_stream", "memory per open stream (KiB)", False),
    ("ttfb_c1_p50", "first text byte, p50, 1 client (ms)", False),
    ("ttfb_c50_p50", "first text byte, p50, 50 clients at once (ms)", False),
    ("cpu_turn_c1", "worker CPU per turn, 1 client (ms)", False),
    ("cpu_turn_c50", "worker CPU per turn, 50 clients at once (ms)", False),
]
# A part pays for itself on what a stream costs (CPU per delta, streams held, memory) or on what
# starting one costs (CPU per turn, which is what a burst of new conversations waits on).
DECIDING = ("cpu_per_1k", "max_streams", "kib_per_stream", "cpu_turn_c50")


def summary(target: dict[str, Any], repeat: int) -> dict[str, float | None]:
    """The figures of one arm in one repeat. Memory counts only in the first: a process keeps the
    memory its first sweep grew to, so later streams reuse it and would look free."""
    return {
        "cpu_per_1k": target["cpu_per_1k"],
        "max_streams": target["max_streams"],
        "kib_per_stream": target["kib_per_stream"] if repeat == 0 else None,
        "ttfb_c1_p50": target["first_byte"]["1"]["p50_ms"],
        "ttfb_c50_p50": target["first_byte"]["50"]["p50_ms"],
        "cpu_turn_c1": target["first_byte"]["1"].get("cpu_ms_per_turn"),
        "cpu_turn_c50": target["first_byte"]["50"].get("cpu_ms_per_turn"),
    }


def gain(ours: float | None, theirs: float | None, higher_better: bool) -> float | None:
    """How much better `ours` is than `theirs`, as a fraction of theirs (0.15: 15% better)."""
    if ours is None or theirs is None or math.isnan(ours) or math.isnan(theirs) or theirs <= 0:
        return None
    return ours / theirs - 1 if higher_better else 1 - ours / theirs


def decide(runs: dict[str, list[dict[str, float | None]]]) -> list[dict[str, Any]]:
    """For each part: its gain on each deciding figure (the range over repeats) and whether it stays."""
    decisions = []
    service = runs["service"]
    higher = {key: hb for key, _, hb in FIGURES}
    for arm in ARMS:
        if arm.part is None or arm.name not in runs:
            continue
        gains: dict[str, list[float]] = {}
        for key in DECIDING:
            paired = [
                gain(ours.get(key), theirs.get(key), higher[key])
                for ours, theirs in zip(service, runs[arm.name], strict=True)
            ]
            gains[key] = [g for g in paired if g is not None]
        paying = [key for key, values in gains.items() if values and min(values) >= RULE]
        decisions.append(
            {"arm": arm.name, "part": arm.part, "gains": gains, "keep": bool(paying), "by": paying}
        )
    return decisions


def _range(values: list[float | None], digits: int) -> str:
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return "n/a"
    low, high = min(present), max(present)

    def fmt(v: float) -> str:
        return f"{int(v):,}" if float(v).is_integer() and abs(v) >= 10 else f"{v:.{digits}f}"

    return fmt(low) if low == high else f"{fmt(low)} to {fmt(high)}"


def markdown(results: dict[str, Any]) -> str:
    runs: dict[str, list[dict[str, float | None]]] = results["ablation"]
    labels = {"floor": "floor (stand-in direct)", "tutorial": "tutorial (sync SDK, threads)"}
    labels["idiomatic"] = "idiomatic async (FastAPI + AsyncAnthropic + StreamingResponse)"
    labels.update({arm.name: arm.label for arm in ARMS})
    names = [name for name in labels if name in runs]
    fixed = results["fixed_load"]
    header = "| arm | " + " | ".join(label.format(fixed=fixed) for _, label, _ in FIGURES) + " |"
    lines = [
        f"Ablation: {len(next(iter(runs.values())))} interleaved repeats, each a range from the lowest to the highest.",
        "",
        header,
        "|---|" + "---:|" * len(FIGURES),
    ]
    for name in names:
        cells = [
            _range([run.get(key) for run in runs[name]], 3 if key.startswith("cpu") else 2)
            for key, _, _ in FIGURES
        ]
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| part | gain on CPU per delta | on streams held | on memory per stream | on CPU per turn "
        f"| ≥ {RULE:.0%} in every repeat |",
    ]
    lines.append("|---|---:|---:|---:|---:|---|")
    for decision in decide(runs):
        cells = [_range([g * 100 for g in decision["gains"][key]], 0) + " %" for key in DECIDING]
        verdict = f"keep ({', '.join(decision['by'])})" if decision["keep"] else "**library comes back**"
        lines.append(f"| {decision['part']} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines) + "\n"
