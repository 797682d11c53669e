"""A session's turn lock: taken by `begin_turn.lua`, renewed while a reply streams, released by token.

Why release and renew must check the token:

    worker A takes the lock (ttl 30 s) and stalls longer than that
    the lock expires; worker B takes it for the next turn
    A wakes up and releases "its" lock: a plain DEL would free B's lock and let a third turn in

With the token, A's release and renewal find someone else's token and do nothing, and A's commit
(which checks the same token) writes nothing.
"""

from __future__ import annotations

from api.store.redis import Client
from api.store.scripts import ScriptCall, Scripts


class SessionLock:
    __slots__ = ("held", "key", "redis", "scripts", "token", "ttl_ms")

    def __init__(self, redis: Client, scripts: Scripts, key: str, token: str, ttl_ms: int) -> None:
        self.redis = redis
        self.scripts = scripts
        self.key = key
        self.token = token
        self.ttl_ms = ttl_ms
        self.held = True

    async def renew(self) -> bool:
        self.held = bool(await self.renew_call().run())
        return self.held

    async def release(self) -> None:
        if self.held:
            await self.release_call().run()

    # The same steps as calls, for sending with others in one round trip.

    def renew_call(self) -> ScriptCall:
        return ScriptCall(self.scripts.renew_lock, [self.key], [self.token, self.ttl_ms])

    def release_call(self) -> ScriptCall:
        self.held = False
        return ScriptCall(self.scripts.release_lock, [self.key], [self.token])
