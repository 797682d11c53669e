"""The Lua scripts shipped in `api/store/lua/`, registered on a client and run by SHA.

redis-py's `AsyncScript` sends EVALSHA and, on NOSCRIPT (a fresh or restarted Redis), loads the
source and retries, so a Redis restart needs nothing from us. `run_together` keeps that promise for
several scripts sent in one round trip.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError
from redis.typing import EncodableT

log = logging.getLogger("api.store.scripts")


def script_source(name: str) -> str:
    return resources.files("api.store").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Scripts:
    begin_turn: AsyncScript
    commit_turn: AsyncScript
    release_lock: AsyncScript
    renew_lock: AsyncScript
    create_session: AsyncScript
    admit: AsyncScript
    settle: AsyncScript
    renew_lease: AsyncScript
    attach_reader: AsyncScript
    append_reply: AsyncScript
    claim_turn: AsyncScript
    release_claim: AsyncScript

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        return cls(**{name: redis.register_script(script_source(name)) for name in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class ScriptCall:
    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[EncodableT]

    async def run(self) -> Any:
        return await self.script(keys=self.keys, args=self.args)


async def give_back(call: ScriptCall) -> None:
    """Undo a step whose outcome is unknown; shielded, so that a client leaving cannot stop it. If
    Redis cannot be reached for it either, what was taken expires on its own."""
    try:
        await asyncio.shield(call.run())
    except BaseException:
        log.debug("could not give back what an unconfirmed step may have taken", exc_info=True)


async def run_together(redis: Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run scripts in one round trip: a pipeline, not a transaction, as each script is atomic on its own.

    A script's own error comes back in its place in the list, so one failing does not hide that the
    others ran; a connection error raises. (A Script object in a pipeline would check SCRIPT EXISTS
    first, a round trip more; a NOSCRIPT reply is rare enough to pay for when it happens.)
    """
    if len(calls) == 1:
        return [await _run_one(calls[0])]
    async with redis.pipeline(transaction=False) as pipe:
        for call in calls:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
    missing = [index for index, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:
        # Redis lost its scripts (a restart): load each once, then send those calls again together,
        # rather than one round trip (and one kept exception) per call, hundreds for a renewal.
        for script in {calls[index].script for index in missing}:
            await redis.script_load(script.script)
        async with redis.pipeline(transaction=False) as pipe:
            for index in missing:
                call = calls[index]
                pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
            again = await pipe.execute(raise_on_error=False)
        for index, result in zip(missing, again, strict=True):
            results[index] = result
    return results


async def _run_one(call: ScriptCall) -> Any:
    try:
        return await call.run()
    except ResponseError as exc:  # the script's own error (AsyncScript already dealt with NOSCRIPT)
        return exc
