"""One pipelined Redis connection for the rate limiter's per-request script call.

Why not redis-py here: each of its asyncio commands costs ~190 us of CPU on the project's
VM (pool lock, retry wrapper, stream reader), ~20% of a scaled-out request; the key cache
avoids it with a memory layer, but a shared rate limit needs Redis on every request.
This is the least that does the job: one connection per worker, commands written as they
come (pipelined, replies in order), replies parsed by hiredis (redis-py's own C parser),
~80 us per call (docs/design.md). It speaks only what the limiter needs: AUTH, SELECT,
EVALSHA with an EVAL fallback. Connection, TLS and AUTH settings come from the cache's
URL (parsed by redis-py) and password. A call that gets no reply within `timeout` drops
the connection and fails every call waiting on it; the next call reconnects. Every
failure is a RedisWireError, which the limiter answers by failing open (ratelimit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections import deque
from typing import cast

import hiredis


class RedisWireError(Exception):
    pass


def _pack(args: tuple[str | bytes, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self.waiting: deque[tuple[float, asyncio.Future[object]]] = deque()
        self.transport: asyncio.Transport | None = None
        self.timeout = timeout
        self._watch: asyncio.TimerHandle | None = None
        self.on_lost: asyncio.Future[None] | None = None  # set by RedisWire.close
        self._out: list[bytes] = []  # commands of this step of the loop, written together

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is no asyncio.Transport subclass)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                _, future = self.waiting.popleft()
                if future.done():
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(RedisWireError(str(reply)[:200]))
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError):  # not Redis, or a reply nobody asked for
            self.drop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.on_lost is not None and not self.on_lost.done():
            self.on_lost.set_result(None)
        while self.waiting:
            _, future = self.waiting.popleft()
            if not future.done():
                future.set_exception(RedisWireError("connection lost"))

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # connection_lost fails whatever waits

    def send(self, args: tuple[str | bytes, ...]) -> asyncio.Future[object]:
        if self.transport is None or self.transport.is_closing():
            raise RedisWireError("not connected")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        if not self.waiting:  # nothing in flight: nothing to share a write with, send it now
            self.transport.write(_pack(args))
        else:
            if not self._out:
                loop.call_soon(self._write)
            self._out.append(_pack(args))
        self.waiting.append((loop.time(), future))
        if self._watch is None:
            self._watch = loop.call_later(self.timeout, self._check)
        return future

    def _write(self) -> None:
        """One write (one system call) for every command sent during the last step of the
        loop while others were in flight: under load, many requests' calls share it."""
        out, self._out = self._out, []
        if self.transport is not None:
            self.transport.write(b"".join(out))

    def _check(self) -> None:
        """One timer for the connection, not one per call: the oldest call is late -> drop."""
        self._watch = None
        if not self.waiting:
            return
        loop = asyncio.get_running_loop()
        sent, _ = self.waiting[0]
        if loop.time() - sent >= self.timeout:
            self.drop()
        else:
            self._watch = loop.call_later(self.timeout - (loop.time() - sent), self._check)


class RedisWire:
    def __init__(self, url: str, password: str | None = None, timeout: float = 3.0) -> None:
        from redis.asyncio.connection import SSLConnection, parse_url

        opts = parse_url(url)
        self.host, self.port = str(opts.get("host", "127.0.0.1")), int(opts.get("port", 6379))
        self.db, self.username = int(opts.get("db", 0)), opts.get("username")
        self.password = password if password is not None else opts.get("password")
        self.tls = opts.get("connection_class") is SSLConnection
        self.timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def call(self, *args: str | bytes) -> object:
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            protocol = await self._connect()
        return await protocol.send(args)

    async def script(self, sha: str, body: str, keys: list[str], args: list[str]) -> object:
        try:
            return await self.call("EVALSHA", sha, str(len(keys)), *keys, *args)
        except RedisWireError as exc:
            if not str(exc).startswith("NOSCRIPT"):  # a restarted Redis forgot it: send it whole
                raise
        return await self.call("EVAL", body, str(len(keys)), *keys, *args)

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # callers arriving meanwhile share the one connection
            if self._protocol is not None and self._protocol.transport is not None:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                _, protocol = await asyncio.wait_for(loop.create_connection(
                    lambda: _Protocol(self.timeout), self.host, self.port,
                    ssl=ssl.create_default_context() if self.tls else None), self.timeout)
            except (OSError, TimeoutError) as exc:
                raise RedisWireError(type(exc).__name__) from exc
            try:
                if self.password:
                    await protocol.send(("AUTH", self.username, self.password) if self.username
                                        else ("AUTH", self.password))
                if self.db:
                    await protocol.send(("SELECT", str(self.db)))
            except BaseException:
                protocol.drop()
                raise
            self._protocol = protocol
            return protocol

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            closed = asyncio.get_running_loop().create_future()
            protocol.on_lost = closed
            protocol.drop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed, 1.0)


def sha1(body: str) -> str:
    return hashlib.sha1(body.encode()).hexdigest()  # noqa: S324 - Redis names scripts by their SHA-1
