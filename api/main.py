"""The public entry points: `api.main:app` for an ASGI server, `api.main.create_app` for embedders.

`app` is built on first access rather than at import, so importing this module reads no environment
and connects to nothing.
"""

from __future__ import annotations

from typing import Any

from api.http.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # `uvicorn api.main:app` (and each worker process of `chat-api serve`) lands here.
    if name == "app":
        from api.config import load_settings
        from api.ops.logs import configure_logging

        settings = load_settings()
        configure_logging(settings)
        return create_app(settings, own_process=True)
    raise AttributeError(name)
