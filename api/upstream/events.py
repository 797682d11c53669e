"""A lean decoder for the Messages API's server-sent events: raw bytes in, reply text out.

It follows the SDK's decoder rules (an event without an `event:` line is skipped, `ping` and unknown
events are ignored, `error` raises) but decodes only what a relay needs, so each text delta costs one
small JSON parse instead of a tree of typed objects.
"""

from __future__ import annotations

from typing import Any

import orjson


class UpstreamEventError(Exception):
    """The upstream sent an `event: error` inside an otherwise successful (200) response."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message


class ReplyDecoder:
    __slots__ = (
        "_cr_pending",
        "_pending",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "done",
        "error",
        "input_tokens",
        "message_id",
        "output_tokens",
        "stop_reason",
    )

    def __init__(self) -> None:
        self._pending = b""
        self._cr_pending = False
        self.done = False
        self.error: UpstreamEventError | None = None  # an error event that came after text in one read
        self.stop_reason: str | None = None
        self.message_id: str | None = None
        # As Claude reports them: input_tokens is only the part of the prompt neither read from nor
        # written to the prompt cache.
        self.input_tokens = 0
        self.cache_creation_input_tokens = 0
        self.cache_read_input_tokens = 0
        self.output_tokens = 0

    def feed(self, chunk: bytes) -> bytes:
        """Consume raw bytes; return the UTF-8 text of every complete text delta they finish."""
        if self._cr_pending and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the second half of a CRLF split across reads
        buf = self._pending + chunk if self._pending else chunk
        if b"\r" in buf:
            self._cr_pending = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            self._cr_pending = False
        out: list[bytes] = []
        start = 0
        try:
            while (end := buf.find(b"\n\n", start)) >= 0:
                if end > start:
                    self._event(buf[start:end], out)
                start = end + 2
        except UpstreamEventError as exc:
            if not out:
                raise
            # The text before the error was sent first; the error is raised by `check` after it.
            self.error = exc
            self._pending = b""
            return b"".join(out)
        self._pending = buf[start:]
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def check(self) -> None:
        """Raise the error event held back by `feed` so that the text before it went out first."""
        if self.error is not None:
            raise self.error

    def _event(self, block: bytes, out: list[bytes]) -> None:
        name = b""
        data = b""
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                part = line[6:] if line[5:6] == b" " else line[5:]
                data = data + b"\n" + part if data else part
            elif line.startswith(b"event:"):
                name = line[6:].strip()
        try:
            if name == b"content_block_delta":
                delta = orjson.loads(data)["delta"]
                if delta.get("type") == "text_delta" and delta["text"]:
                    out.append(delta["text"].encode())
            elif name in _HANDLED:
                self._control(name, orjson.loads(data) if data else {}, out)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Not the protocol: the reply cannot be trusted from here on.
            raise UpstreamEventError(
                "invalid_event", f"malformed {name.decode(errors='replace')} event"
            ) from exc

    def _control(self, name: bytes, event: dict[str, Any], out: list[bytes]) -> None:
        if name == b"message_start":
            message = event.get("message") or {}
            self.message_id = message.get("id")
            self._usage(message.get("usage") or {})
        elif name == b"message_delta":
            self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason
            self._usage(event.get("usage") or {})
        elif name == b"message_stop":
            self.done = True
        elif name == b"content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "text" and block.get("text"):
                out.append(block["text"].encode())
        elif name == b"error":
            error = event.get("error") or {}
            raise UpstreamEventError(str(error.get("type", "error")), str(error.get("message", "")))

    def _usage(self, usage: dict[str, Any]) -> None:
        # message_delta's counts are cumulative and overwrite message_start's when present.
        if (value := usage.get("input_tokens")) is not None:
            self.input_tokens = int(value)
        if (value := usage.get("cache_creation_input_tokens")) is not None:
            self.cache_creation_input_tokens = int(value)
        if (value := usage.get("cache_read_input_tokens")) is not None:
            self.cache_read_input_tokens = int(value)
        if (value := usage.get("output_tokens")) is not None:
            self.output_tokens = int(value)


_HANDLED = frozenset({b"message_start", b"message_delta", b"message_stop", b"content_block_start", b"error"})
