"""The byte-level reply decoder: same text however the bytes are split, every event kind handled."""

from __future__ import annotations

import orjson
import pytest

from api.upstream.events import ReplyDecoder, UpstreamEventError


def event(name: str | None, data: dict[str, object], eol: str = "\n") -> bytes:
    head = f"event: {name}{eol}" if name else ""
    return f"{head}data: {orjson.dumps(data).decode()}{eol}{eol}".encode()


def delta(text: str, eol: str = "\n") -> bytes:
    return event(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        eol,
    )


def transcript(texts: list[str], eol: str = "\n") -> bytes:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "usage": {
                "input_tokens": 7,
                "cache_read_input_tokens": 3,
                "cache_creation_input_tokens": 2,
                "output_tokens": 1,
            },
        },
    }
    parts = [
        event("message_start", start, eol),
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            eol,
        ),
        event("ping", {"type": "ping"}, eol),
        *(delta(text, eol) for text in texts),
        event("future_event", {"type": "future_event", "text": "not reply text"}, eol),
        event(
            None,
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "no event line"}},
            eol,
        ),
        event("content_block_stop", {"type": "content_block_stop", "index": 0}, eol),
        event(
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}},
            eol,
        ),
        event("message_stop", {"type": "message_stop"}, eol),
    ]
    return b"".join(parts)


TEXTS = ["Hel", "lo, ", "wörld ", "🙂", ' "quoted"\n', "end"]


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_every_split_gives_the_same_text_and_usage(eol: str) -> None:
    raw = transcript(TEXTS, eol)
    for size in (1, 2, 3, 7, 64, len(raw)):
        decoder = ReplyDecoder()
        out = b"".join(decoder.feed(raw[i : i + size]) for i in range(0, len(raw), size))
        assert out.decode() == "".join(TEXTS), size
        assert decoder.done
        assert decoder.stop_reason == "end_turn"
        # The cache's reads and writes are kept apart from the uncached input, as Claude bills them.
        assert decoder.input_tokens == 7
        assert decoder.cache_read_input_tokens == 3
        assert decoder.cache_creation_input_tokens == 2
        assert decoder.output_tokens == 9
        assert decoder.message_id == "msg_1"


def test_not_done_without_message_stop() -> None:
    decoder = ReplyDecoder()
    out = decoder.feed(transcript(["a", "b"]).split(b"event: content_block_stop")[0])
    assert out == b"ab"
    assert not decoder.done


def test_error_event_raises_with_its_type() -> None:
    decoder = ReplyDecoder()
    decoder.feed(delta("partial"))
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(UpstreamEventError) as caught:
        decoder.feed(event("error", error))
    assert caught.value.error_type == "overloaded_error"


def test_non_text_deltas_are_not_reply_text() -> None:
    decoder = ReplyDecoder()
    thinking = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "thinking_delta", "thinking": "hmm"},
    }
    assert decoder.feed(event("content_block_delta", thinking) + delta("yes")) == b"yes"


def test_multiline_data_is_joined() -> None:
    decoder = ReplyDecoder()
    raw = b'event: content_block_delta\ndata: {"type":"content_block_delta",\ndata: "delta":{"type":"text_delta","text":"x"}}\n\n'
    assert decoder.feed(raw) == b"x"


@pytest.mark.parametrize(
    "event",
    [
        b"event: content_block_delta\ndata: {not json\n\n",
        b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n',
        b"event: message_start\ndata: [1, 2]\n\n",
    ],
)
def test_a_malformed_event_is_an_upstream_error_not_a_crash(event: bytes) -> None:
    with pytest.raises(UpstreamEventError) as caught:
        ReplyDecoder().feed(event)
    assert caught.value.error_type == "invalid_event"


def test_an_error_after_text_in_one_read_lets_the_text_out_first() -> None:
    decoder = ReplyDecoder()
    text = decoder.feed(
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"partial"}}\n\n'
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
    assert text == b"partial"
    with pytest.raises(UpstreamEventError) as caught:
        decoder.check()
    assert caught.value.error_type == "overloaded_error"
