"""store/redis_wire.py: the limiter's pipelined Redis connection, against the real Redis
(its own test database) and against servers that misbehave on loopback."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator

import pytest

from tests.conftest import REDIS_URL, free_port, need_redis
from tests.test_store import redis_with_password  # noqa: F401  (a Redis of the test's own, with AUTH)
from tollway.store.redis_wire import RedisWire, RedisWireError, sha1

pytestmark = pytest.mark.redis


@pytest.fixture
def wire_url() -> Iterator[str]:
    need_redis()
    yield REDIS_URL


async def test_pipelined_calls_get_their_own_replies_in_order(wire_url: str) -> None:
    wire = RedisWire(wire_url)
    key = "tollway-test:wire:" + secrets.token_hex(6)
    try:
        replies = await asyncio.gather(*(wire.call("ECHO", str(i)) for i in range(200)))
        assert replies == [str(i) for i in range(200)]
        assert await wire.call("SET", key, "v", "PX", "5000") == "OK"
        assert await wire.call("GET", key) == "v"
        with pytest.raises(RedisWireError, match=r"^WRONGTYPE"):
            await wire.call("HGET", key, "f")
        assert await wire.call("GET", key) == "v", "an error reply fails its own call only"
    finally:
        await wire.call("DEL", key)
        await wire.close()


async def test_a_script_redis_does_not_know_is_sent_whole(wire_url: str) -> None:
    wire = RedisWire(wire_url)
    body = f"return '{secrets.token_hex(8)}' .. ARGV[1]"  # never loaded: EVALSHA answers NOSCRIPT
    try:
        assert await wire.script(sha1(body), body, [], ["x"]) == body.split("'")[1] + "x"
        assert await wire.script(sha1(body), body, [], ["y"]) == body.split("'")[1] + "y"  # now cached
    finally:
        await wire.close()


async def test_auth_and_database_come_from_the_url_and_password(redis_with_password: tuple[str, str]) -> None:  # noqa: F811
    url, password = redis_with_password
    wire = RedisWire(url.rsplit("/", 1)[0] + "/3", password)
    try:
        assert await wire.call("SET", "k", "in-db-3") == "OK"
        assert "db=3" in str(await wire.call("CLIENT", "INFO"))
    finally:
        await wire.close()
    wrong = RedisWire(url, "not-the-password")
    with pytest.raises(RedisWireError):
        await wrong.call("PING")
    await wrong.close()


async def test_refused_silent_and_dropped_servers_fail_fast_then_it_reconnects(wire_url: str) -> None:
    refused = RedisWire(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(RedisWireError):
        await refused.call("PING")
    assert time.monotonic() - started < 1

    # A server that accepts and never answers: the call fails after the timeout, not later.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1 << 16):
            pass  # never answers; ends when the client hangs up, so no writer outlives the test's loop
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    wire = RedisWire(f"redis://127.0.0.1:{port}/0", timeout=0.3)
    started = time.monotonic()
    results = await asyncio.gather(*(wire.call("PING") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RedisWireError) for r in results)
    assert time.monotonic() - started < 1.5
    await wire.close()
    server.close()
    await asyncio.sleep(0.1)  # the handlers see the hang-up and close their ends

    # A connection Redis drops (CLIENT KILL): the next call reconnects.
    wire = RedisWire(wire_url)
    try:
        client_id = await wire.call("CLIENT", "ID")
        killer = RedisWire(wire_url)
        await killer.call("CLIENT", "KILL", "ID", str(client_id))
        await killer.close()
        await asyncio.sleep(0.1)  # the close reaches this side
        assert await wire.call("PING") == "PONG"
        assert await wire.call("CLIENT", "ID") != client_id
    finally:
        await wire.close()
