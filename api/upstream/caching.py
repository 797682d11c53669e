"""Prompt caching: where a request marks its prompt so that Claude can read the conversation so far from
its cache instead of processing it again (a cache read is billed at a tenth of the input price).

The Messages API caches a prompt's prefix up to a block marked with `cache_control`, and looks for a
cached prefix at the marker and up to 20 blocks before it. Each turn marks the last block of its newest
message, so turn N writes the conversation up to its user message, and turn N+1, two blocks longer,
finds it and pays only for what is new. A system prompt gets a marker of its own: it comes first in the
prompt, so a long one shared by many conversations is read from the cache even by a conversation's
first turn. Two of the four markers a request may carry; a prefix under the model's minimum (1,024 to
4,096 tokens) is simply not cached.

The marked message is sent as a one-block list, which the API reads exactly as the same text sent as
a string: the prefix's bytes are those of the stored history, whichever turn marked them.
"""

from __future__ import annotations

from typing import Any

EPHEMERAL: dict[str, str] = {"type": "ephemeral"}  # the default ttl: 5 minutes, refreshed by each read


def prompt(messages: list[dict[str, str]], system: str | None, *, cache: bool) -> dict[str, Any]:
    """The request's `messages` and, when there is one, `system`, marked for the cache if `cache`."""
    if not cache or not messages:
        return {"messages": messages, "system": system} if system else {"messages": messages}
    last = messages[-1]
    marked = {"role": last["role"], "content": [_block(last["content"])]}
    params: dict[str, Any] = {"messages": [*messages[:-1], marked]}
    if system:
        params["system"] = [_block(system)]
    return params


def _block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "cache_control": EPHEMERAL}
