"""The benchmark still runs end to end and reports every figure (its numbers are not judged here:
performance is read from the bench's own output, never from timed assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import ROOT


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_quick_bench_run_measures_every_target_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    run = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for name in ("floor", "tutorial", "service"):
        target = results["targets"][name]
        assert target["max_streams"] > 0, (name, target["sweep"])
        assert all(level["errors"] == 0 for level in target["sweep"]), (name, target["sweep"])
        assert target["first_byte"]["1"]["errors"] == 0
        assert target["kib_per_stream"] is not None
    # A committed session turn goes through Redis: the meter must have seen it.
    assert results["redis"]["turns"] > 0
    assert results["redis"]["round_trips"] >= 1
    assert "EVALSHA" in results["redis"]["by_name"]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| figure |" in table
    assert run.stdout.strip().startswith("| figure |")
