"""Clerk-issued keys on `tollway serve --workers 4` over PostgreSQL + Redis: a signed Clerk
webhook, answered by any one worker, evicts the key from all four before its 2xx.

The fake Clerk Backend API runs in this test process on loopback; the gateway is a real
`tollway serve` (4 worker processes, a fresh database).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import (
    DEMO_MODELS,
    REDIS_URL,
    ServerThread,
    free_port,
    fresh_pg_database,
    need_postgres,
    need_redis,
    run_aside,
    to_toml,
)
from tests.fakes.clerk_api import FakeClerk, subject
from tests.test_clerk import CLERK_SK, EVICT_EVENT, WHSEC, event, signed

pytestmark = pytest.mark.slow

WORKERS = 4


class Served:
    def __init__(self, url: str, db_url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.db_url, self.proc, self.log = url, db_url, proc, log

    def count(self, query: str, *args: Any) -> int:
        async def run() -> int:
            conn = await asyncpg.connect(self.db_url)
            try:
                return int(await conn.fetchval(query, *args))
            finally:
                await conn.close()

        return run_aside(run())

    def workers(self) -> int:
        return self.count("SELECT count(*) FROM workers")

    def tenants(self, external_id: str) -> int:
        return self.count("SELECT count(*) FROM tenants WHERE external_id = $1", external_id)


@pytest.fixture
def clerk_gateway(serve_app: Callable[[Any], ServerThread], tmp_path: Path) -> Iterator[tuple[Served, FakeClerk]]:
    need_postgres()
    need_redis()
    fake = FakeClerk(CLERK_SK)
    fake_url = serve_app(fake.app()).url
    port = free_port()
    with fresh_pg_database() as db_url:
        config = tmp_path / "tollway.toml"
        config.write_text(to_toml({
            "server": {"host": "127.0.0.1", "port": port},
            "database": {"url": db_url},
            "cache": {"url": REDIS_URL},
            "auth": {"issuer": "clerk", "clerk_api_url": fake_url, "clerk_evict_events": [EVICT_EVENT]},
            **DEMO_MODELS,
        }), encoding="utf-8")
        log = tmp_path / "serve.log"
        env = {**os.environ, "CLERK_SECRET_KEY": CLERK_SK, "CLERK_WEBHOOK_SIGNING_SECRET": WHSEC,
               "TOLLWAY_KEY_SECRET": "clerk-scaleout-key-secret-0123456789"}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tollway", "serve", "--config", str(config), "--workers", str(WORKERS)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        served = Served(f"http://127.0.0.1:{port}", db_url, proc, log)
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
                try:
                    ready = httpx.get(served.url + "/readyz", timeout=2).status_code == 200
                except httpx.TransportError:
                    ready = False
                if ready and served.workers() == WORKERS:
                    break
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
                time.sleep(0.2)
            yield served, fake
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # the session we started: uvicorn and its workers
                    proc.wait(timeout=10)


async def test_webhook_eviction_reaches_all_4_workers(clerk_gateway: tuple[Served, FakeClerk]) -> None:
    served, fake = clerk_gateway
    key, key_id = fake.add_key(subject())
    headers = {"authorization": f"Bearer {key}"}
    # Many connections, so every worker serves (and caches) the key.
    clients = [httpx.AsyncClient(base_url=served.url, timeout=30, headers=headers) for _ in range(32)]
    try:
        for _ in range(5):
            statuses = await asyncio.gather(*[c.get("/v1/models") for c in clients])
            assert {r.status_code for r in statuses} == {200}, [r.text for r in statuses]
        assert len(fake.verify_calls) <= WORKERS, "verified once, then Redis and each worker's memory"
        fake.keys[key]["revoked"] = True  # revoked in Clerk's UI: caches still admit it
        assert (await clients[0].get("/v1/models")).status_code == 200
        payload = event(EVICT_EVENT, key_id)
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as hook:
            r = await hook.post("/webhooks/clerk", content=payload, headers=signed(payload))
        assert r.status_code == 200 and r.json()["outcome"] == "evicted the key", r.text
        # From the 2xx on, no worker admits it: every connection, repeatedly.
        for _ in range(5):
            statuses = await asyncio.gather(*[c.get("/v1/models") for c in clients])
            assert {r.status_code for r in statuses} == {401}, [r.status_code for r in statuses]
        assert time.monotonic() - started < 15, "well inside the 60 s cache window"
        # A new subject seen by every worker at once becomes one tenant.
        org = subject("org")
        org_keys = [fake.add_key(org)[0] for _ in range(8)]
        fake.delay = 0.2
        statuses = await asyncio.gather(*[c.get("/v1/models", headers={"authorization": f"Bearer {org_keys[i % 8]}"})
                                          for i, c in enumerate(clients)])
        assert {r.status_code for r in statuses} == {200}
        assert served.tenants(f"clerk:{org}") == 1
    finally:
        for c in clients:
            await c.aclose()
