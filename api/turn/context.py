"""What the upstream is sent: the newest stored messages that fit the context budget, then the new one."""

from __future__ import annotations

from typing import Any


def estimate_tokens(text: str) -> int:
    # A deliberate over-estimate (about 4 bytes of UTF-8 per token) so trimmed context fits.
    return (len(text.encode()) + 3) // 4


def build_context(history: list[dict[str, Any]], user_text: str, budget: int) -> list[dict[str, str]]:
    """The newest messages that fit `budget` tokens with the new message, never opening on the assistant."""
    used = estimate_tokens(user_text)
    start = len(history)
    while start > 0:
        message = history[start - 1]
        cost = message.get("tokens") or estimate_tokens(message["content"])
        if used + cost > budget:
            break
        used += cost
        start -= 1
    while start < len(history) and history[start]["role"] != "user":
        start += 1
    context = [{"role": m["role"], "content": m["content"]} for m in history[start:]]
    context.append({"role": "user", "content": user_text})
    return context
