"""The tutorial's design, as the bench's baseline: the sync Anthropic client inside `StreamingResponse`,
history in a dict. Written the way the FastAPI tutorial writes it, so the bench measures what teams
start from; only its thread pool is raised (from anyio's 40), so that its limit is its cost per event
rather than a thread count.

Run: ``python -m tests.bench.tutorial --port 8002`` with ``ANTHROPIC_BASE_URL`` and ``ANTHROPIC_API_KEY`` set.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anthropic
import anyio.to_thread
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

MODEL = "claude-sonnet-4-5"
THREADS = 4000

client = anthropic.Anthropic(max_retries=2)
sessions: dict[str, list[dict[str, str]]] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
    yield


app = FastAPI(lifespan=lifespan)


class ChatIn(BaseModel):
    message: str


def reply(messages: list[dict[str, str]], history: list[dict[str, str]] | None) -> Iterator[str]:
    parts: list[str] = []
    try:
        with client.messages.stream(model=MODEL, max_tokens=1024, messages=messages) as stream:
            for text in stream.text_stream:
                parts.append(text)
                yield text
    except anthropic.APIConnectionError:
        yield "\n[error: could not reach Claude]"
        return
    except anthropic.APIStatusError as exc:
        yield f"\n[error: {exc.message}]"
        return
    if history is not None:
        history.append(messages[-1])
        history.append({"role": "assistant", "content": "".join(parts)})


@app.post("/chat/stream")
def chat_stream(body: ChatIn) -> StreamingResponse:
    if not body.message.strip():
        raise HTTPException(400, "message must not be empty")
    return StreamingResponse(
        reply([{"role": "user", "content": body.message}], None), media_type="text/plain"
    )


@app.post("/chat/{session_id}/stream")
def session_stream(session_id: str, body: ChatIn) -> StreamingResponse:
    if not body.message.strip():
        raise HTTPException(400, "message must not be empty")
    history = sessions.setdefault(session_id, [])
    messages = [*history, {"role": "user", "content": body.message}]
    return StreamingResponse(reply(messages, history), media_type="text/plain")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.tutorial")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The same server settings as the service's own workers, so the comparison is of the app alone.
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
