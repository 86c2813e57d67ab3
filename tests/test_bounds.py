"""Hostile clients against a real `tollway serve` over real sockets (serving.py,
proxy/streams.py): clients that trickle headers or a body, open many idle connections,
send oversized headers, or open many streams with one key. Meanwhile the server answers
other clients within normal latency, and its memory stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import ServerThread, free_port
from tests.fakes.harness import PROVIDER_KEY, fake_models
from tests.fakes.openai_upstream import FakeOpenAI
from tests.test_ledger import _run, _serve
from tollway.config import Config
from tollway.services import Services
from tollway.store.schema import ledger_entries, usage_events

BOUNDS = {"header_timeout_seconds": 1, "body_timeout_seconds": 2, "max_header_bytes": 8192,
          "keepalive_timeout_seconds": 1, "max_connections": 120, "max_streams_per_key": 3}
LATENCY_BOUND = 1.5  # seconds: generous for a loaded 2-core machine; an idle one answers in a few ms
RSS_BOUND = 40 * 2**20


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def _gateway(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
             fake: FakeOpenAI | None = None) -> Iterator[tuple[int, list[str], int, Config]]:
    """A gateway with the small bounds above; yields (port, two funded keys, server pid, config)."""
    upstream = serve_app((fake or FakeOpenAI(PROVIDER_KEY)).app)
    port = free_port()
    cfg = make_config(server={"port": port, **BOUNDS}, models=fake_models(), providers={
        "fake": {"type": "openai", "base_url": upstream.url + "/v1", "api_key_env": "FAKE_PROVIDER_KEY"},
        "echo": {"type": "echo"}})

    async def setup(s: Services) -> list[str]:
        await s.store.migrate()
        keys = []
        for name in ("Ada", "Bo"):
            tid = str((await s.tenants.create(name))["tenant_id"])
            await s.ledger.credit(tid, 50_000_000, f"fund-{tid}")
            keys.append(str((await s.keys.create(tid))["key"]))
        return keys

    keys = _run(cfg, setup)
    proc = _serve(cfg, port, 1)
    try:
        yield port, keys, proc.pid, cfg
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


async def _latencies(port: int, key: str, seconds: float) -> list[float]:
    """A well-behaved client: one chat call after another on a new connection each."""
    out = []
    end = time.monotonic() + seconds
    body = {"model": "demo/echo", "messages": [{"role": "user", "content": "hi"}]}
    while time.monotonic() < end:
        async with httpx.AsyncClient(timeout=10) as c:
            t = time.monotonic()
            r = await c.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {key}"})
            out.append(time.monotonic() - t)
            assert r.status_code == 200, r.text
        await asyncio.sleep(0.05)
    return out


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _answer(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    t = time.monotonic()
    data = await asyncio.wait_for(reader.read(), within)
    return data, time.monotonic() - t


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[bytes, float]:
    """A slowloris: a header byte every 50 ms (200 s to finish, if allowed). Returns what
    the server answered and after how long."""
    started = time.monotonic()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-a: " + b"a" * 4000
    for i in range(len(head)):
        with contextlib.suppress(ConnectionError):
            writer.write(head[i:i + 1])
            await writer.drain()
        try:
            first = await asyncio.wait_for(reader.read(65_536), 0.05)  # loses nothing if cancelled
        except TimeoutError:
            continue
        rest, _ = await _answer(reader, 5)
        writer.close()
        return first + rest, time.monotonic() - started
    raise AssertionError("the slowloris client was never cut off")


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw else 0


def _error_code(raw: bytes) -> str:
    return str(json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["code"])


@pytest.mark.slow
def test_slow_and_idle_clients_are_cut_off_while_others_are_served(
        make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread]) -> None:
    with _gateway(make_config, serve_app) as (port, (key, _), pid, _cfg):
        async def scenario() -> None:
            baseline = await _latencies(port, key, 1.0)
            rss_before = _rss(pid)

            async def slowloris() -> tuple[bytes, float]:
                return await _trickle(*await _open(port))

            async def idle() -> tuple[bytes, float]:
                reader, writer = await _open(port)
                try:
                    return await _answer(reader, 10)
                finally:
                    writer.close()

            hostile = [asyncio.create_task(slowloris()) for _ in range(40)]
            hostile += [asyncio.create_task(idle()) for _ in range(60)]
            await asyncio.sleep(0.3)
            during = await _latencies(port, key, 2.0)
            cut = await asyncio.gather(*hostile)
            for raw, after in cut[:40]:  # the slowloris: a 408 once the header timeout passed
                assert _status(raw) == 408 and _error_code(raw) == "header_timeout", raw
                assert 0.9 <= after <= 3.0, after
            for raw, after in cut[40:]:  # idle: closed without a word after the header timeout
                assert raw == b"" and 0.9 <= after <= 3.0, after
            assert len(during) >= 5
            assert max(during) < LATENCY_BOUND, (during, baseline)
            assert statistics.median(during) < max(0.5, 10 * statistics.median(baseline)), (during, baseline)
            assert _rss(pid) - rss_before < RSS_BOUND

            # Past max_connections (120): 503 at once, then closed.
            held = [await _open(port) for _ in range(120)]
            reader, writer = await _open(port)
            raw, after = await _answer(reader, 5)
            assert _status(raw) == 503 and _error_code(raw) == "too_many_connections" and after < 0.5, raw
            writer.close()
            for _, w in held:
                w.close()
            await asyncio.sleep(0.2)
            assert (await _latencies(port, key, 0.3))  # served again once they are gone

            # An idle keep-alive connection is closed after keepalive_timeout_seconds.
            reader, writer = await _open(port)
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            first = await reader.readuntil(b'{"status":"ok"}')
            assert first.startswith(b"HTTP/1.1 200")
            rest, after = await _answer(reader, 5)
            assert rest == b"" and 0.9 <= after <= 2.5, after
            writer.close()

        asyncio.run(scenario())


@pytest.mark.slow
def test_oversized_headers_and_slow_bodies_are_refused(
        make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread]) -> None:
    with _gateway(make_config, serve_app) as (port, (key, _), pid, cfg):
        async def scenario() -> None:
            # One header over the limit, sent at once: 431.
            reader, writer = await _open(port)
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"b" * 9000 + b"\r\n\r\n")
            raw, _ = await _answer(reader, 5)
            assert _status(raw) == 431 and _error_code(raw) == "headers_too_large", raw
            writer.close()
            # Many small headers adding up past it: 431 too.
            reader, writer = await _open(port)
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"".join(
                b"x-h%d: %s\r\n" % (i, b"v" * 90) for i in range(100)) + b"\r\n")
            raw, _ = await _answer(reader, 5)
            assert _status(raw) == 431, raw
            writer.close()
            # A header that never ends, sent as fast as the socket takes it: cut off near the
            # limit, not buffered (llhttp would keep all of it).
            rss_before = _rss(pid)
            reader, writer = await _open(port)
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-endless: ")
            sent = 0
            with contextlib.suppress(ConnectionError):
                while sent < 64 * 2**20:
                    writer.write(b"e" * 65_536)
                    await writer.drain()
                    sent += 65_536
            # The 431 went out, but closing a socket with unread bytes sends a reset, which
            # may reach the client first.
            with contextlib.suppress(ConnectionError):
                raw, _ = await _answer(reader, 5)
                assert _status(raw) in (0, 431), raw
            assert sent < 16 * 2**20, sent  # the server closed long before
            assert _rss(pid) - rss_before < RSS_BOUND
            writer.close()
            # A body that trickles: 408 after body_timeout_seconds, nothing charged.
            reader, writer = await _open(port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + key.encode()
                         + b"\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"model\": ")
            raw, after = await _answer(reader, 10)
            assert _status(raw) == 408 and _error_code(raw) == "body_timeout", raw
            assert 1.8 <= after <= 4.0, after
            writer.close()
            # A slowloris on a kept-alive connection, after a body that set a longer bound: the
            # header timeout still holds.
            reader, writer = await _open(port)
            writer.write(b"POST /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
            assert head.startswith(b"HTTP/1.1 405") and await reader.readexactly(length)
            await asyncio.sleep(0.5)
            raw, after = await _trickle(reader, writer)
            assert _status(raw) == 408 and _error_code(raw) == "header_timeout" and 0.9 <= after <= 2.5, (raw, after)
            # A header under the limit is fine.
            r = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"x-fine": "f" * 7000})
            assert r.status_code == 200

        asyncio.run(scenario())

        async def charged(s: Services) -> int:
            async with s.store.read() as conn:
                return int((await conn.execute(sa.select(sa.func.count()).select_from(usage_events))).scalar_one())

        assert _run(cfg, charged) == 0


@pytest.mark.slow
def test_streams_per_key_past_the_limit_get_a_429_and_reserve_nothing(
        make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread]) -> None:
    fake = FakeOpenAI(PROVIDER_KEY, slow_chunks=30, slow_interval=0.1)
    with _gateway(make_config, serve_app, fake) as (port, (key, other), _pid, cfg):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": "acme/slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}

        async def scenario() -> None:
            async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {key}"}) as c:
                async def stream() -> int:
                    async with c.stream("POST", url, json=body) as r:
                        async for _ in r.aiter_bytes():
                            pass
                        return r.status_code

                running = [asyncio.create_task(stream()) for _ in range(3)]
                while len(fake.requests) < 3:
                    await asyncio.sleep(0.02)
                refused = [await c.post(url, json=body) for _ in range(20)]
                for r in refused:
                    assert r.status_code == 429, r.text
                    error = r.json()["error"]
                    assert error["code"] == "too_many_streams" and error["type"] == "rate_limit_error"
                    assert "server.max_streams_per_key = 3" in error["message"]
                assert len(fake.requests) == 3  # nothing forwarded
                t = time.monotonic()  # the same key's JSON calls, and another key's streams, go on
                json_call = await c.post(url, json={"model": "demo/echo", "messages": [{"role": "user",
                                                                                       "content": "hi"}]})
                assert json_call.status_code == 200 and time.monotonic() - t < LATENCY_BOUND
                async with c.stream("POST", url, json=body, headers={"authorization": f"Bearer {other}"}) as r:
                    assert r.status_code == 200
                assert await asyncio.gather(*running) == [200, 200, 200]
                again = await c.post(url, json=dict(body, model="demo/echo"))  # a slot is free again
                assert again.status_code == 200
                return None

        asyncio.run(scenario())

        async def books(s: Services) -> tuple[int, int]:
            async with s.store.read() as conn:
                rows = (await conn.execute(sa.select(sa.func.count()).select_from(usage_events)
                                           .where(usage_events.c.status == 429))).scalar_one()
                entries = (await conn.execute(sa.select(sa.func.count()).select_from(ledger_entries)
                                              .where(ledger_entries.c.kind == "reserve"))).scalar_one()
            return int(rows), int(entries)

        assert _run(cfg, books) == (0, 0)
