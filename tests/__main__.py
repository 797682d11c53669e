"""`python -m tests`: the one gate. Lint, formatting, types, then the whole test suite.

Extra arguments go to pytest, e.g. `python -m tests -k turns -x`.
"""

from __future__ import annotations

import subprocess
import sys

STEPS = [
    ["ruff", "check", "api", "tests"],
    ["ruff", "format", "--check", "api", "tests"],
    ["mypy"],
    ["pytest", *sys.argv[1:]],
]

for step in STEPS:
    print(f"==> {' '.join(step)}", flush=True)
    code = subprocess.call([sys.executable, "-m", *step])
    if code:
        sys.exit(code)
