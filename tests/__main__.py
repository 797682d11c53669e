"""`python -m tests`: the one gate. Lint, formatting, types, the whole test suite, then the turn,
admission and multi-worker suites again on a Redis Cluster of their own (CHAT_REDIS_MODE=cluster,
which the suite's fixtures and the workers they start both read).

Extra arguments go to pytest, e.g. `python -m tests -k turns -x`; with any, the cluster pass is left out.
"""

from __future__ import annotations

import os
import subprocess
import sys

ON_CLUSTER = ["tests/test_turns.py", "tests/test_admission_workers.py", "tests/test_workers.py"]

STEPS: list[tuple[list[str], dict[str, str]]] = [
    (["ruff", "check", "api", "tests"], {}),
    (["ruff", "format", "--check", "api", "tests"], {}),
    (["mypy"], {}),
    (["pytest", *sys.argv[1:]], {}),
]
if not sys.argv[1:]:
    STEPS.append((["pytest", *ON_CLUSTER], {"CHAT_REDIS_MODE": "cluster"}))

for step, env in STEPS:
    shown = " ".join([*(f"{k}={v}" for k, v in env.items()), *step])
    print(f"==> {shown}", flush=True)
    code = subprocess.call([sys.executable, "-m", *step], env={**os.environ, **env})
    if code:
        sys.exit(code)
