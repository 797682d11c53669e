"""Running the app under uvicorn, tuned for long-lived streams."""

from __future__ import annotations

import uvicorn

from api.config import Settings
from api.logs import configure_logging


def uvicorn_options(settings: Settings) -> dict[str, object]:
    return {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "access_log": False,
        "log_config": None,
        "proxy_headers": False,
        # Streams are long; keep idle keep-alive connections from a load balancer around.
        "timeout_keep_alive": 75,
        "timeout_graceful_shutdown": settings.drain_seconds,
        "backlog": 4096,
    }


def serve(settings: Settings) -> None:
    configure_logging(settings)
    uvicorn.run("api.main:app", workers=settings.workers, **uvicorn_options(settings))  # type: ignore[arg-type]
