"""The Lua scripts shipped in `api/lua/`, registered on a client and run by SHA.

redis-py's `AsyncScript` sends EVALSHA and, on NOSCRIPT (a fresh or restarted Redis), loads the
source and retries, so a Redis restart needs nothing from us.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


def script_source(name: str) -> str:
    return resources.files("api").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Scripts:
    begin_turn: AsyncScript
    commit_turn: AsyncScript
    release_lock: AsyncScript
    renew_lock: AsyncScript
    create_session: AsyncScript

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        return cls(**{name: redis.register_script(script_source(name)) for name in cls.__dataclass_fields__})
