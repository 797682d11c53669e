"""One connection to Redis that all of a worker's calls of a kind share at once.

Redis answers a connection's commands in the order they came, so calls need not take turns for a
connection of their own: each is written as it comes (all those of one loop iteration in one write)
and its reply is the next one off the wire. This is for the script calls every turn makes (a bundle:
admission with the session's lock, then the commit with its settlement); everything else goes
through redis-py. redis-py's pool gives each call a connection of its own, and its bookkeeping per
call (the pool's lock and condition, retries, event hooks, packing in Python, a stream reader) costs
a worker about a third of a turn's CPU: docs/hand-written-parts.md has the measurement, and
`CHAT_REDIS_SHARED_CONNECTION=false` turns this off.

What a pooled connection would do is kept: a reply parsed by hiredis, as redis-py parses it, with a
Redis error raised as redis-py's own exception; TCP keepalive as redis-py sets it; a connection that fails or a Redis that does not
answer within the call's time limit raises redis-py's `ConnectionError` or `TimeoutError`, and the
next call connects again. The address, credentials, database and TLS settings are those of
redis-py's own connection for the same URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Mapping
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import AuthenticationError, ReadOnlyError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("api.store.multiplex")

# An error reply becomes the exception redis-py raises for it (NOSCRIPT, READONLY, LOADING, a full
# server, ...): redis-py's own table, so the callers' handling of redis-py's errors holds here too.
reply_error = BaseParser.parse_error

# What `gets` returns while a reply is incomplete: a value no reply can be.
_INCOMPLETE = object()


def _replica_said_so(reply: Any) -> bool:
    """A write refused because this Redis is now a replica: at the top, or inside a bundle's list,
    where each script's own error is kept in its place."""
    if isinstance(reply, ReadOnlyError):
        return True
    return isinstance(reply, list) and any(isinstance(item, ReadOnlyError) for item in reply)


class _Link(asyncio.Protocol):
    """A connected socket: what was sent, in order, waiting for its reply."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: AbstractConnection, timeout: float) -> None:
        self.loop = loop
        self.settings = settings
        self.timeout = timeout
        self.reader = hiredis.Reader(replyError=reply_error, notEnoughData=_INCOMPLETE)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        # When each call waiting was sent, oldest first. Redis answers in order, so while the oldest
        # has waited less than the time limit so has every other: one timer watches them all,
        # rather than one per call.
        self.sent_at: deque[float] = deque()
        self.watch: asyncio.TimerHandle | None = None
        self.pending: list[bytes] = []  # written at the end of this loop iteration
        self.transport: asyncio.Transport | None = None
        self.lost: RedisError | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass asyncio's
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        settings = self.settings
        if isinstance(settings, Connection) and settings.socket_keepalive:
            # As redis-py's own connections do: a peer that vanished without a word (a NAT or a load
            # balancer that dropped an idle connection) is found before a turn waits on it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            options = settings.socket_keepalive_options
            for option, value in options.items() if isinstance(options, Mapping) else ():
                sock.setsockopt(socket.IPPROTO_TCP, option, value)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.lost is not None:
            raise self.lost
        future = self.loop.create_future()
        self.waiting.append(future)
        self.sent_at.append(self.loop.time())
        if self.watch is None:
            self.watch = self.loop.call_at(self.sent_at[0] + self.timeout, self._check)
        if not self.pending:
            self.loop.call_soon(self._flush)
        self.pending.append(command)
        return future

    def _flush(self) -> None:
        if self.transport is not None and self.pending and self.lost is None:
            self.transport.write(b"".join(self.pending))
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not _INCOMPLETE:
                future = self.waiting.popleft()
                self.sent_at.popleft()
                if not future.done():  # its caller may have gone: the reply is read, and dropped
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            # Not Redis's protocol, or a reply nobody asked for: nothing after it can be trusted.
            self.fail(RedisConnectionError(f"Redis sent what cannot be read: {exc!r}"))

    def _check(self) -> None:
        self.watch = None
        if not self.sent_at:
            return
        if self.loop.time() - self.sent_at[0] >= self.timeout:
            # Redis is stuck, or the network is: every call behind the oldest would wait as long.
            self.fail(RedisTimeoutError(f"no reply from Redis within {self.timeout} s"))
        else:
            self.watch = self.loop.call_at(self.sent_at[0] + self.timeout, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"Redis closed the connection: {exc or 'end of stream'}"))

    def fail(self, error: RedisError) -> None:
        """Close, and fail every call still waiting: their outcome is unknown, as on any lost
        connection (each caller gives back what its call may have taken)."""
        if self.lost is None:
            self.lost = error
        if self.transport is not None:
            self.transport.abort()
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():  # an exception of its own each: a traceback is its caller's
                future.set_exception(type(error)(*error.args))
        self.sent_at.clear()
        self.pending.clear()


class SharedConnection:
    """Calls sent on one connection at once; see the module's docstring."""

    def __init__(self, redis: Redis, call_timeout: float) -> None:
        pool = redis.connection_pool
        # redis-py's own connection for this URL, never connected: its settings are what we use.
        self.settings: AbstractConnection = pool.connection_class(**pool.connection_kwargs)
        self.call_timeout = call_timeout
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None
        self._closed = False

    async def call(self, *args: Any) -> Any:
        """One command's reply; an error reply is raised, as redis-py raises it (one inside a list
        stays in its place)."""
        command = hiredis.pack_command(args)
        link = self._link
        if link is None or link.lost is not None:
            link = await self._connect()
        reply = await link.send(command)  # the link fails it if Redis does not answer in time
        if _replica_said_so(reply):
            # This Redis became a replica: connect again, to whatever the address now names.
            link.fail(RedisConnectionError("Redis is now a replica"))
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def _connect(self) -> _Link:
        if self._closed:
            raise RedisConnectionError("the shared connection to Redis is closed")
        # One attempt at a time: the calls that arrive meanwhile wait for the same connection. One
        # that ended with nobody waiting (its callers gone) is stale: a new attempt is made.
        connecting = self._connecting
        if connecting is None or connecting.done():
            connecting = self._connecting = asyncio.get_running_loop().create_task(self._open())
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and connecting.cancelled() and (task is None or not task.cancelling()):
                raise RedisConnectionError("the shared connection to Redis is closed") from None
            raise
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> _Link:
        loop = asyncio.get_running_loop()
        settings = self.settings
        link = _Link(loop, settings, self.call_timeout)
        try:
            async with asyncio.timeout(settings.socket_connect_timeout or self.call_timeout):
                if isinstance(settings, UnixDomainSocketConnection):
                    await loop.create_unix_connection(lambda: link, settings.path)
                elif isinstance(settings, SSLConnection):
                    await loop.create_connection(
                        lambda: link, settings.host, settings.port, ssl=settings.ssl_context.get()
                    )
                else:
                    assert isinstance(settings, Connection)
                    await loop.create_connection(lambda: link, settings.host, settings.port)
                await self._handshake(link)
        except TimeoutError as exc:
            link.fail(RedisTimeoutError("connecting timed out"))
            raise RedisTimeoutError("connecting to Redis timed out") from exc
        except OSError as exc:
            link.fail(RedisConnectionError(str(exc)))
            raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from exc
        except BaseException:
            link.fail(RedisConnectionError("the connection was not completed"))
            raise
        if self._closed:  # closed while this was on its way
            link.fail(RedisConnectionError("closed"))
            raise RedisConnectionError("the shared connection to Redis is closed")
        self._link = link
        return link

    async def _handshake(self, link: _Link) -> None:
        settings = self.settings
        steps: list[tuple[Any, ...]] = []
        if settings.credential_provider is not None:
            steps.append(("AUTH", *await settings.credential_provider.get_credentials_async()))
        elif settings.password is not None:
            steps.append(("AUTH", *filter(None, (settings.username, settings.password))))
        if settings.db:
            steps.append(("SELECT", settings.db))
        if settings.client_name:
            steps.append(("CLIENT", "SETNAME", settings.client_name))
        # A Redis that refuses the connection (too many clients) says so at once: the reply to the
        # first step, never to a caller's command.
        steps.append(("PING",))
        replies = await asyncio.gather(*(link.send(hiredis.pack_command(step)) for step in steps))
        for step, reply in zip(steps, replies, strict=True):
            if isinstance(reply, RedisError):
                error = AuthenticationError if step[0] == "AUTH" else RedisConnectionError
                raise error(f"Redis refused {step[0]}: {reply}")

    async def aclose(self) -> None:
        """Close it; a call from here on raises `ConnectionError`, as on a closed redis-py client."""
        self._closed = True
        connecting = self._connecting
        if connecting is not None and not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError):
                await connecting
        if self._link is not None:
            self._link.fail(RedisConnectionError("closed"))
            self._link = None
