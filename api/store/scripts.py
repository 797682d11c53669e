"""The Lua scripts shipped in `api/store/lua/`, registered on a client and run by SHA.

redis-py's `AsyncScript` sends EVALSHA and, on NOSCRIPT (a fresh or restarted Redis, a promoted
replica, a node that took over a slot), loads the source on every primary and retries, so none of
these needs anything from us. `run_together` keeps that promise for several scripts sent at once.

Each script touches the keys of one slot. On a cluster, scripts of different slots go in redis-py's
cluster pipeline, which sends one batch per node, all at once, and follows MOVED and ASK itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError
from redis.typing import EncodableT

from api.store.multiplex import SharedConnection
from api.store.redis import Client, TimedClusterPipeline, TimedPipeline

log = logging.getLogger("api.store.scripts")


@functools.cache  # read once, however many clients and bundles are built from it
def script_source(name: str) -> str:
    return resources.files("api.store").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


# Runs several of the scripts below in one EVALSHA, each as it would run alone (its own KEYS and ARGV,
# its own error kept in its place), optionally each only if the one before it said yes.
_BUNDLE_RUNNER = """
-- ARGV[1] '1': run each call only while every call before it returned {1, ...}; '0': run them all
-- ARGV[2] how many calls; then for each: the script's index, its key count, its arg count
-- then every call's args, in order; KEYS: every call's keys, in order
-- returns each call's result (an error reply in place of one that failed), up to the last one run
local gated, count = ARGV[1] == '1', tonumber(ARGV[2])
local results, k, a = {}, 0, 2 + 3 * count
for i = 1, count do
  local base = 2 + 3 * (i - 1)
  local run = scripts[tonumber(ARGV[base + 1])]
  local nk, na = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local keys, args = {}, {}
  for j = 1, nk do keys[j] = KEYS[k + j] end
  for j = 1, na do args[j] = ARGV[a + j] end
  k, a = k + nk, a + na
  local ok, result = pcall(run, keys, args)
  if ok then
    results[i] = result
  elseif type(result) == 'table' and result.err then
    results[i] = result
  else
    results[i] = {err = tostring(result)}
  end
  if gated and not (ok and type(result) == 'table' and result[1] == 1) then
    break
  end
end
return results
"""


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
    read_page: AsyncScript
    attach_reader: AsyncScript
    append_reply: AsyncScript
    claim_turn: AsyncScript
    release_claim: AsyncScript

    @classmethod
    def register(cls, redis: Client) -> Scripts:
        return cls(**{name: redis.register_script(script_source(name)) for name in cls.__dataclass_fields__})

    @classmethod
    def sources(cls) -> list[str]:
        return [script_source(name) for name in cls.__dataclass_fields__]


class Bundle:
    """Every script in one, so that calls a step makes together cost one EVALSHA on one Redis instead
    of a pipeline (redis-py's pipeline costs a worker about twice a single call's CPU), and calls
    that depend on each other (admission, then the session's lock) need no second round trip.

    Not on a cluster: a script may touch only the keys of one slot there, and these calls' keys are
    in different slots. The calls run as one atomic step, which each of them was already alone.
    """

    def __init__(self, redis: Client, scripts: Scripts, shared: SharedConnection | None = None) -> None:
        self.redis = redis
        self.shared = shared  # where the bundle goes, when set (one Redis); else redis-py's pool
        self.script = redis.register_script(self.source())
        self._index = {
            getattr(scripts, name).sha: index for index, name in enumerate(Scripts.__dataclass_fields__, 1)
        }

    @staticmethod
    def source() -> str:
        functions = [
            f"scripts[{index}] = function(KEYS, ARGV)\n{script_source(name)}\nend"
            for index, name in enumerate(Scripts.__dataclass_fields__, 1)
        ]
        return "local scripts = {}\n" + "\n".join(functions) + _BUNDLE_RUNNER

    async def run(self, calls: Sequence[ScriptCall], *, gated: bool = False) -> list[Any]:
        """Each call's result, or a `ResponseError` in its place; with `gated`, only up to the first
        call whose result is not {1, ...}. A connection error raises."""
        keys: list[str] = []
        layout: list[EncodableT] = ["1" if gated else "0", len(calls)]
        args: list[EncodableT] = []
        for call in calls:
            layout += [self._index[call.script.sha], len(call.keys), len(call.args)]
            keys += call.keys
            args += call.args
        if self.shared is None:
            results: list[Any] = await self.script(keys=keys, args=layout + args)
            return results
        command = ("EVALSHA", self.script.sha, len(keys), *keys, *layout, *args)
        try:
            return await self.shared.call(*command)  # type: ignore[no-any-return]
        except NoScriptError:
            # A restarted Redis, or one that was flushed: load it, as AsyncScript would, and send again.
            await self.redis.script_load(self.script.script)
            return await self.shared.call(*command)  # type: ignore[no-any-return]


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


@dataclass(frozen=True, slots=True)
class Confirm:
    """After the first call, wait until this many replicas hold what it wrote (WAIT), for at most
    `timeout_ms`. WAIT counts the writes of the connection it is sent on: it goes in the same batch."""

    replicas: int
    timeout_ms: int


async def run_together(
    redis: Client, calls: Sequence[ScriptCall], confirm: Confirm | None = None, bundle: Bundle | None = None
) -> list[Any]:
    """Run scripts in one round trip (one per node on a cluster, sent at once): a pipeline, not a
    transaction, as each script is atomic on its own.

    A script's own error comes back in its place in the list, so one failing does not hide that the
    others ran; a connection error raises. With `confirm`, WAIT's reply (how many replicas hold the
    first call's writes) comes last. With a `bundle` (one Redis, not a cluster) and nothing to
    confirm, they go as one script. (A Script object in a pipeline would check SCRIPT EXISTS first,
    a round trip more; a NOSCRIPT reply is rare enough to pay for when it happens.)
    """
    if len(calls) == 1 and confirm is None:
        return [await _run_one(calls[0])]
    if bundle is not None and confirm is None:
        return await bundle.run(calls)
    results = await _send(redis, calls, confirm)
    missing = [
        index for index, result in enumerate(results[: len(calls)]) if isinstance(result, NoScriptError)
    ]
    if missing:
        # Redis lost its scripts (a restart, a failover): load each once, then send those calls again
        # together, rather than one round trip (and one kept exception) per call, hundreds for a renewal.
        for script in {calls[index].script for index in missing}:
            await redis.script_load(script.script)
        again = await _send(redis, [calls[index] for index in missing], confirm if 0 in missing else None)
        for index, result in zip(missing, again, strict=False):
            results[index] = result
        if 0 in missing and confirm is not None:
            results[-1] = again[-1]
    return results


async def _send(redis: Client, calls: Sequence[ScriptCall], confirm: Confirm | None) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for call in calls:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        if confirm is not None:
            wait = ("WAIT", confirm.replicas, confirm.timeout_ms)
            if isinstance(redis, RedisCluster):
                # To the node of the first call's slot: the batch for that node shares one connection.
                node = redis.nodes_manager.get_node_from_slot(redis.keyslot(calls[0].keys[0]))
                pipe.execute_command(*wait, target_nodes=node)
            else:
                pipe.execute_command(*wait)
            # WAIT may take its whole timeout: the batch is given that long on top of its own.
            if isinstance(pipe, TimedPipeline | TimedClusterPipeline):
                pipe.call_timeout += confirm.timeout_ms / 1000
        results: list[Any] = await pipe.execute(raise_on_error=False)
    return results


async def _run_one(call: ScriptCall) -> Any:
    try:
        return await call.run()
    except ResponseError as exc:  # the script's own error (AsyncScript already dealt with NOSCRIPT)
        return exc
