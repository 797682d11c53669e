"""Running the app under uvicorn, tuned for long-lived streams."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import uvicorn

from api.config import Settings
from api.http.protocol import ChatHttpProtocol, JsonErrorProtocol
from api.ops.logs import configure_logging
from api.ops.metrics import MULTIPROC_DIR, prepare_shared_dir

# On SIGTERM the app first drains for up to CHAT_DRAIN_SECONDS (api/ops/drain.py); what is still running
# once uvicorn takes over gets this long before it is cut.
CLOSE_SECONDS = 2


def uvicorn_options(settings: Settings) -> dict[str, object]:
    return {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        # uvicorn's own httptools protocol, or (CHAT_HTTP_PROTOCOL=chat) ours, which also tells a turn
        # when its client leaves
        "http": ChatHttpProtocol if settings.http_protocol == "chat" else JsonErrorProtocol,
        "lifespan": "on",
        "access_log": False,
        "log_config": None,
        "proxy_headers": False,
        # Streams are long; keep idle keep-alive connections from a load balancer around, longer than
        # the balancer keeps them (nginx: 60 s), so that it is always the one to close them.
        "timeout_keep_alive": 75,
        "timeout_graceful_shutdown": CLOSE_SECONDS,
        "backlog": 4096,
    }


def serve(settings: Settings) -> None:
    configure_logging(settings)
    created = None
    if settings.workers > 1 or os.environ.get(MULTIPROC_DIR):
        # Worker processes inherit the environment, so they all find the directory for their metrics.
        shared = os.environ.get(MULTIPROC_DIR)
        if not shared:
            shared = created = tempfile.mkdtemp(prefix="chat-api-metrics-")
            os.environ[MULTIPROC_DIR] = shared
        prepare_shared_dir(Path(shared))
    try:
        uvicorn.run("api.main:app", workers=settings.workers, **uvicorn_options(settings))  # type: ignore[arg-type]
    finally:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
