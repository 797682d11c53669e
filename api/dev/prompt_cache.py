"""The stand-in's prompt cache, emulating the Messages API's so that what caching saves can be shown
and tested with no network.

As the API does it: a prompt is its `system` blocks, then each message's content blocks, in order (a
string is one text block). A block marked with `cache_control` (or the last block, for a top-level
`cache_control`) is a breakpoint; at most 4. For each breakpoint the longest prefix seen before is
looked for at the breakpoint and up to 20 blocks before it, keyed on the exact bytes of every block up
to there (the marker itself excluded: moving it does not change the prefix) and on the model. The
longest hit is read; each breakpoint past it whose prefix holds at least `min_tokens` is written. An
entry lives `ttl` seconds, and each read or write gives it that long again.

Usage then reads as the API's: `cache_read_input_tokens` for the prefix read, `cache_creation_input_tokens`
for what was written past it, and `input_tokens` for the rest only. Tokens are counted as the rest of
the stand-in counts them, a token per 4 characters.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

MAX_BREAKPOINTS = 4
LOOKBACK_BLOCKS = 20
# Anthropic's smallest per-model minimum (Claude Sonnet 4.5 and 4.6, Opus 4.1); others need 2,048 or 4,096.
DEFAULT_MIN_TOKENS = 1024
DEFAULT_TTL_SECONDS = 300.0
_MAX_ENTRIES = 100_000


class TooManyBreakpoints(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class CacheUsage:
    input_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class PromptCache:
    def __init__(
        self,
        min_tokens: int = DEFAULT_MIN_TOKENS,
        ttl: float = DEFAULT_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_tokens = min_tokens
        self.ttl = ttl
        self.clock = clock
        self._entries: dict[bytes, float] = {}  # prefix digest -> when it expires

    def usage(self, body: dict[str, Any], total_tokens: int) -> CacheUsage:
        """Look the request's prefixes up, write the new ones, and say how its input was billed."""
        blocks = _blocks(body)
        marks = [i for i, (_, _, marked) in enumerate(blocks) if marked]
        if body.get("cache_control") is not None and blocks:
            marks.append(len(blocks) - 1)
        marks = sorted(set(marks))
        if len(marks) > MAX_BREAKPOINTS:
            raise TooManyBreakpoints(
                f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(marks)}."
            )
        if not marks:
            return CacheUsage(total_tokens)
        now = self.clock()
        digests: list[bytes] = []
        tokens: list[int] = []
        digest, chars = orjson.dumps(body.get("model")), 0
        for data, size, _ in blocks:
            digest = hashlib.blake2b(digest + data, digest_size=16).digest()
            chars += size
            digests.append(digest)
            tokens.append(chars // 4)
        hit = -1
        for mark in marks:
            for i in range(mark, max(-1, mark - LOOKBACK_BLOCKS), -1):
                if self._entries.get(digests[i], 0.0) > now:
                    hit = max(hit, i)
                    break
        read = tokens[hit] if hit >= 0 else 0
        if hit >= 0:
            self._entries[digests[hit]] = now + self.ttl
        written = read
        for mark in marks:
            if mark > hit and tokens[mark] >= self.min_tokens:
                self._keep(digests[mark], now)
                written = max(written, tokens[mark])
        read = min(read, total_tokens)
        creation = min(written - read, total_tokens - read)
        return CacheUsage(total_tokens - read - creation, creation, read)

    def _keep(self, digest: bytes, now: float) -> None:
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries = {key: until for key, until in self._entries.items() if until > now}
            while len(self._entries) >= _MAX_ENTRIES:
                del self._entries[next(iter(self._entries))]
        self._entries[digest] = now + self.ttl


def _blocks(body: dict[str, Any]) -> list[tuple[bytes, int, bool]]:
    """Each block of the prompt, in order: its bytes (role and block, the marker left out), its
    characters, and whether it is marked."""
    out: list[tuple[bytes, int, bool]] = []
    system = body.get("system")
    if system:
        out += _content_blocks("system", system)
    for message in body.get("messages") or ():
        out += _content_blocks(message["role"], message["content"])
    return out


def _content_blocks(role: str, content: Any) -> list[tuple[bytes, int, bool]]:
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    out: list[tuple[bytes, int, bool]] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        plain = {key: value for key, value in block.items() if key != "cache_control"}
        text = plain.get("text")
        size = len(text) if isinstance(text, str) else len(orjson.dumps(plain))
        data = orjson.dumps([role, plain], option=orjson.OPT_SORT_KEYS)
        out.append((data, size, block.get("cache_control") is not None))
    return out
