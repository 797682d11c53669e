"""The connection a worker's turns share (api/store/multiplex.py), against a real redis-server of the
test's own: replies reach their callers in order however many are in flight, errors are redis-py's,
and a Redis that restarts, stops answering, asks for a password or becomes a replica is dealt with
as a pooled connection would deal with it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.store.multiplex import SharedConnection
from tests.processes import RedisServer, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("shared"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def shared(server: RedisServer) -> AsyncIterator[SharedConnection]:
    client = Redis.from_url(server.url)
    connection = SharedConnection(client, call_timeout=2.0)
    try:
        yield connection
    finally:
        await connection.aclose()
        await client.aclose()


def clients_of(port: int, name: str) -> int:
    admin = redis.Redis(port=port)
    try:
        return sum(1 for client in admin.client_list() if client.get("name") == name)
    finally:
        admin.close()


async def test_each_of_many_calls_at_once_gets_its_own_reply_on_one_connection(server: RedisServer) -> None:
    client = Redis.from_url(f"{server.url}?client_name=shared-test")
    shared = SharedConnection(client, call_timeout=2.0)
    try:
        replies = await asyncio.gather(*(shared.call("ECHO", f"call-{n}") for n in range(500)))
        assert replies == [f"call-{n}".encode() for n in range(500)]
        assert clients_of(server.port, "shared-test") == 1
    finally:
        await shared.aclose()
        await client.aclose()


async def test_an_error_reply_is_redis_pys_own_and_nested_ones_stay_in_place(
    shared: SharedConnection,
) -> None:
    with pytest.raises(NoScriptError):
        await shared.call("EVALSHA", "0" * 40, 0)
    with pytest.raises(ResponseError, match="unknown command"):
        await shared.call("NO-SUCH-COMMAND")
    reply = await shared.call("EVAL", "return {1, redis.error_reply('ERR kept in its place'), 'x'}", 0)
    assert reply[0] == 1 and reply[2] == b"x"
    assert isinstance(reply[1], ResponseError) and "kept in its place" in str(reply[1])
    assert await shared.call("PING") == b"PONG"  # the connection is still in step


async def test_a_caller_that_leaves_does_not_put_the_next_one_out_of_step(shared: SharedConnection) -> None:
    # The blocked call's reply (nil, a second later) comes after its caller has gone: the call sent
    # behind it must get its own reply, not the abandoned one.
    blocked = asyncio.ensure_future(shared.call("BLPOP", "shared:never", 1))
    after = asyncio.ensure_future(shared.call("ECHO", "after"))
    await asyncio.sleep(0.05)
    blocked.cancel()
    assert await after == b"after"
    assert await shared.call("ECHO", "later") == b"later"


async def test_a_restarted_redis_fails_the_calls_in_flight_and_the_next_call_connects_again(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "restart")
    server.start()
    client = Redis.from_url(server.url)
    shared = SharedConnection(client, call_timeout=5.0)
    try:
        assert await shared.call("SET", "k", "v") == b"OK"
        in_flight = asyncio.ensure_future(shared.call("BLPOP", "shared:never", 0))
        await asyncio.sleep(0.1)
        server.stop(signal.SIGKILL)
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(in_flight, 5)
        with pytest.raises(RedisConnectionError):
            await shared.call("PING")  # nothing listens yet: a clear error, at once
        server.start()
        assert await shared.call("PING") == b"PONG"
    finally:
        await shared.aclose()
        await client.aclose()
        server.stop()


async def test_a_redis_that_stops_answering_times_out_every_waiting_call_then_recovers(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "stopped")
    server.start()
    assert server.proc is not None
    client = Redis.from_url(server.url)
    shared = SharedConnection(client, call_timeout=0.5)
    try:
        assert await shared.call("PING") == b"PONG"
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            started = asyncio.get_running_loop().time()
            calls = [asyncio.ensure_future(shared.call("ECHO", str(n))) for n in range(3)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(type(r) is RedisTimeoutError for r in results), results
            assert asyncio.get_running_loop().time() - started < 4.0  # the 0.5 s limit, not a hang
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        # The connection that may yet carry the late replies was dropped: a new one answers in step.
        assert await shared.call("ECHO", "again") == b"again"
    finally:
        await shared.aclose()
        await client.aclose()
        server.stop()


async def test_credentials_and_database_come_from_the_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "acl")
    server.start()
    admin = redis.Redis(port=server.port)
    admin.acl_setuser(
        "chat", enabled=True, passwords=["+s3cret"], keys=["*"], channels=["*"], commands=["+@all"]
    )
    admin.config_set("requirepass", "admin-only")  # no command without AUTH from here on
    admin.close()
    right = Redis.from_url(f"redis://chat:s3cret@127.0.0.1:{server.port}/3")
    wrong = Redis.from_url(f"redis://chat:nope@127.0.0.1:{server.port}/3")
    shared = SharedConnection(right, call_timeout=2.0)
    refused = SharedConnection(wrong, call_timeout=2.0)
    try:
        assert await shared.call("SET", "in-db-3", "yes") == b"OK"
        assert await right.get("in-db-3") == b"yes"  # redis-py's own connection, same database
        assert await shared.call("ACL", "WHOAMI") == b"chat"
        with pytest.raises(AuthenticationError):
            await refused.call("PING")
    finally:
        for connection in (shared, refused):
            await connection.aclose()
        await right.aclose()
        await wrong.aclose()
        server.stop()


async def test_a_unix_socket_url(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    server = RedisServer(tmp_path / "unix", extra=["--unixsocket", str(socket_path)])
    server.start()
    client = Redis.from_url(f"unix://{socket_path}?db=2")
    shared = SharedConnection(client, call_timeout=2.0)
    try:
        assert await shared.call("SET", "over-unix", "1") == b"OK"
        assert await client.get("over-unix") == b"1"
    finally:
        await shared.aclose()
        await client.aclose()
        server.stop()


@pytest.mark.parametrize("inside_a_script", [False, True])
async def test_a_redis_that_became_a_replica_is_left_for_a_new_connection(
    tmp_path: Path, inside_a_script: bool
) -> None:
    primary = RedisServer(tmp_path / "primary", extra=["--repl-diskless-sync-delay", "0"])
    replica = RedisServer(tmp_path / "replica")
    primary.start()
    replica.start()
    client = Redis.from_url(replica.url)
    shared = SharedConnection(client, call_timeout=2.0)
    admin = redis.Redis(port=replica.port)
    # A bundle runs each script under pcall: a write refused on a replica comes back inside its list.
    write = (
        (
            "EVAL",
            "local ok, e = pcall(redis.call, 'SET', KEYS[1], 'w') "
            "if ok then return {1} end return {type(e) == 'table' and e or {err = tostring(e)}}",
            1,
            "k",
        )
        if inside_a_script
        else ("SET", "k", "w")
    )
    try:
        assert await shared.call("SET", "k", "v") == b"OK"
        first = await shared.call("CLIENT", "ID")
        admin.replicaof("127.0.0.1", primary.port)
        wait_until(
            lambda: admin.info("replication").get("master_link_status") == "up", 10, "the replica's sync"
        )
        if inside_a_script:
            reply = await shared.call(*write)
            assert isinstance(reply[0], ReadOnlyError)
        else:
            with pytest.raises(ReadOnlyError):
                await shared.call(*write)
        admin.replicaof("no", "one")
        assert await shared.call(*write) in (b"OK", [1])
        assert await shared.call("CLIENT", "ID") != first  # a new connection
    finally:
        admin.close()
        await shared.aclose()
        await client.aclose()
        replica.stop()
        primary.stop()


async def test_a_redis_with_no_room_for_another_client_is_a_connection_error(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "full", extra=["--maxclients", "1"])
    server.start()
    holder = redis.Redis(port=server.port)
    client = Redis.from_url(server.url)
    shared = SharedConnection(client, call_timeout=2.0)
    try:
        assert holder.ping()  # the only client Redis takes
        with pytest.raises(RedisConnectionError):
            await shared.call("ECHO", "no room")
    finally:
        holder.close()
        await shared.aclose()
        await client.aclose()
        server.stop()


async def test_a_closed_connection_refuses_calls_and_fails_those_in_flight(server: RedisServer) -> None:
    client = Redis.from_url(server.url)
    shared = SharedConnection(client, call_timeout=5.0)
    try:
        assert await shared.call("PING") == b"PONG"
        in_flight = asyncio.ensure_future(shared.call("BLPOP", "shared:never", 2))
        await asyncio.sleep(0.05)
        await shared.aclose()
        with pytest.raises(RedisConnectionError):
            await in_flight
        with pytest.raises(RedisConnectionError):
            await shared.call("PING")
    finally:
        await client.aclose()


async def test_a_connection_attempt_that_failed_with_nobody_waiting_is_not_reused(tmp_path: Path) -> None:
    # A socket that takes connections and never answers: the handshake (SELECT, for db 1) hangs
    # until the connect timeout, after its only caller has gone.
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    client = Redis.from_url(f"redis://127.0.0.1:{port}/1?socket_connect_timeout=0.3")
    shared = SharedConnection(client, call_timeout=2.0)
    server = RedisServer(tmp_path / "late")
    try:
        gone = asyncio.ensure_future(shared.call("PING"))
        await asyncio.sleep(0.05)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        attempt = shared._connecting
        assert attempt is not None
        await asyncio.wait([attempt], timeout=5)  # it fails on its own, with nobody waiting
        assert attempt.done()
        silent.close()
        server.port = port
        server.start()
        assert await shared.call("PING") == b"PONG"
    finally:
        silent.close()
        await shared.aclose()
        await client.aclose()
        server.stop()
