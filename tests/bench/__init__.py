"""The benchmark: `python -m tests.bench` (see run.py)."""
