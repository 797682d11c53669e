"""What the upstream is sent: the newest stored messages that fit the context budget, then the new one.

Where the prompt is cached, a conversation whose oldest messages are being left out (over the budget,
or over the stored cap, which drops the oldest on every turn) would start one turn later on every turn:
a new prefix, so a cache write at 1.25 times the input price and never a read. With `stable` the start
moves in steps instead: to a checkpoint, a user message picked by its id (one in four, whatever its
place in the list), so the prefix stays the same for the turns until that checkpoint must go too. The
price is a few messages more left out than the budget needs.
"""

from __future__ import annotations

import hashlib
from typing import Any

CHECKPOINT_ONE_IN = 4


def estimate_tokens(text: str) -> int:
    # A deliberate over-estimate (about 4 bytes of UTF-8 per token) so trimmed context fits.
    return (len(text.encode()) + 3) // 4


def build_context(
    history: list[dict[str, Any]],
    user_text: str,
    budget: int,
    *,
    stable: bool = False,
    capped: bool = False,
) -> list[dict[str, str]]:
    """The newest messages that fit `budget` tokens with the new message, never opening on the assistant.

    With `stable`, a context that leaves messages out (or whose history is `capped`: its oldest
    message goes at this turn's commit) opens on a checkpoint."""
    used = estimate_tokens(user_text)
    start = len(history)
    while start > 0:
        message = history[start - 1]
        cost = message.get("tokens") or estimate_tokens(message["content"])
        if used + cost > budget:
            break
        used += cost
        start -= 1
    if stable and (start > 0 or capped):
        start = next((i for i in range(start, len(history)) if _checkpoint(history[i])), start)
    while start < len(history) and history[start]["role"] != "user":
        start += 1
    context = [{"role": m["role"], "content": m["content"]} for m in history[start:]]
    context.append({"role": "user", "content": user_text})
    return context


def _checkpoint(message: dict[str, Any]) -> bool:
    if message["role"] != "user" or not message.get("id"):
        return False
    return hashlib.blake2b(message["id"].encode(), digest_size=1).digest()[0] % CHECKPOINT_ONE_IN == 0
