"""What prompt caching saves: one 20-turn conversation through the service, with CHAT_PROMPT_CACHE off
and on, against the stand-in model (whose prompt cache behaves as the API's, with its 1,024-token
minimum), read back from GET /usage.

Input is priced as Claude bills it: uncached input at 1, a cache write at 1.25 and a cache read at 0.1
of the input price. The figures are exact (the stand-in counts a token per 4 characters) and the same
on every run. `python -m tests.bench.caching [--turns N]` prints the table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import httpx

from api.config import Settings
from api.dev.standin import StandInThread
from api.main import create_app
from tests.processes import RedisServer, ThreadServer

# A system prompt of about 1,100 tokens, messages of about 150 and replies as long (the stand-in echoes).
SYSTEM = "You answer questions about the weather, briefly and with care. " * 70
MESSAGE = "Turn {n}: what should I wear tomorrow if the forecast says rain in the morning? " * 7
PRICE = {
    "input_tokens": 1.0,
    "cache_creation_input_tokens": 1.25,
    "cache_read_input_tokens": 0.1,
}


def conversation(redis_url: str, mode: str, turns: int, prefix: str = "caching") -> dict[str, Any]:
    """Run `turns` turns of one conversation with the prompt cache `mode`; its usage, as GET /usage tells it."""
    with StandInThread() as standin:
        settings = Settings(
            anthropic_api_key="bench",
            anthropic_base_url=standin.url,
            redis_url=redis_url,
            redis_prefix=f"{prefix}-{mode}",
            prompt_cache=mode,
            system_prompt=SYSTEM,
        )
        with ThreadServer(create_app(settings), "httptools") as server, httpx.Client(timeout=30) as client:
            for n in range(1, turns + 1):
                reply = client.post(f"{server.url}/chat/bench/stream", json={"message": MESSAGE.format(n=n)})
                reply.raise_for_status()
            total: dict[str, Any] = client.get(f"{server.url}/usage").raise_for_status().json()["total"]
    return total


def billed(total: dict[str, Any]) -> float:
    """The conversation's input, in tokens at the full input price."""
    return sum(total[name] * price for name, price in PRICE.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.caching", description=__doc__)
    parser.add_argument("--turns", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        redis = RedisServer(Path(work) / "redis")
        redis.start()
        try:
            totals = {mode: conversation(redis.url, mode, args.turns) for mode in ("off", "auto")}
        finally:
            redis.stop()
    print(f"One conversation of {args.turns} turns through the service, against the stand-in model:")
    print()
    print("| CHAT_PROMPT_CACHE | input_tokens | cache_creation | cache_read | output | input billed as |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, total in totals.items():
        print(
            f"| `{mode}` | {total['input_tokens']:,} | {total['cache_creation_input_tokens']:,} "
            f"| {total['cache_read_input_tokens']:,} | {total['output_tokens']:,} | {billed(total):,.0f} tokens |"
        )
    saved = 1 - billed(totals["auto"]) / billed(totals["off"])
    print()
    print(f"Caching bills {saved:.0%} less input for the same conversation.")


if __name__ == "__main__":
    main()
