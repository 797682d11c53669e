"""The idiomatic async design, as the bench's second baseline: FastAPI, `AsyncAnthropic` on the SDK's
stock transport, a `StreamingResponse`, and the history in Redis (read before the turn, the two new
messages appended once the reply is whole). What a team writes today when it knows asyncio, with none
of this service's hand-written parts.

Run: ``python -m tests.bench.idiomatic --port 8003`` with ``ANTHROPIC_BASE_URL``, ``ANTHROPIC_API_KEY``
and ``REDIS_URL`` set.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anthropic
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from redis.asyncio import Redis

MODEL = "claude-sonnet-4-6"
MAX_MESSAGES = 200

client = anthropic.AsyncAnthropic(max_retries=2)
redis = Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await client.close()
    await redis.aclose()


app = FastAPI(lifespan=lifespan)


class ChatIn(BaseModel):
    message: str


def _key(session_id: str) -> str:
    return f"idiomatic:{session_id}"


async def reply(messages: list[dict[str, str]], session_id: str | None) -> AsyncIterator[str]:
    parts: list[str] = []
    try:
        async with client.messages.stream(model=MODEL, max_tokens=1024, messages=messages) as stream:
            async for text in stream.text_stream:
                parts.append(text)
                yield text
    except anthropic.APIConnectionError:
        yield "\n[error: could not reach Claude]"
        return
    except anthropic.APIStatusError as exc:
        yield f"\n[error: {exc.message}]"
        return
    if session_id is not None:
        answer = {"role": "assistant", "content": "".join(parts)}
        async with redis.pipeline(transaction=True) as pipe:
            pipe.rpush(_key(session_id), json.dumps(messages[-1]), json.dumps(answer))
            pipe.ltrim(_key(session_id), -MAX_MESSAGES, -1)
            await pipe.execute()


@app.post("/chat/stream")
async def chat_stream(body: ChatIn) -> StreamingResponse:
    if not body.message.strip():
        raise HTTPException(400, "message must not be empty")
    return StreamingResponse(
        reply([{"role": "user", "content": body.message}], None), media_type="text/plain"
    )


@app.post("/chat/{session_id}/stream")
async def session_stream(session_id: str, body: ChatIn) -> StreamingResponse:
    if not body.message.strip():
        raise HTTPException(400, "message must not be empty")
    history = [json.loads(raw) for raw in await redis.lrange(_key(session_id), 0, -1)]
    messages = [*history, {"role": "user", "content": body.message}]
    return StreamingResponse(reply(messages, session_id), media_type="text/plain")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.idiomatic")
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
