"""What the lifespan builds and every request reads: typed, rather than loose attributes on the app."""

from __future__ import annotations

from dataclasses import dataclass

from api.config import Settings
from api.http.auth import Authenticator
from api.ops.metrics import Metrics
from api.store.redis import Client
from api.turn.service import ChatService


@dataclass(slots=True)
class AppState:
    settings: Settings
    redis: Client
    chat: ChatService
    auth: Authenticator
    metrics: Metrics
    draining: bool = False  # set once on SIGTERM: readiness and new turns answer 503 (api/ops/drain.py)
