"""Retention: purge deletes exactly the access-log rows past retention and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from tollway import retention
from tollway.config import Config
from tollway.retention import DAY_MS, cutoff_ms, purge_access_log, run_periodic_purge
from tollway.services import Services, build
from tollway.store.db import Store, now_ms
from tollway.store.schema import access_log, ledger_entries, usage_events


def row(created_at: int, request_id: str) -> dict[str, Any]:
    return {"created_at": created_at, "request_id": request_id, "method": "POST", "path": "/v1/chat/completions",
            "status": 200, "client_ip": "192.0.2.1", "latency_ms": 5, "tenant_id": "tn_a"}


async def seed(svc: Services, now: int, days: int) -> None:
    cutoff = now - days * DAY_MS
    tenant = (await svc.tenants.create("Ada", "ada@example.com"))["tenant_id"]
    await svc.ledger.credit_manual(tenant, 5_000_000, "inv-1")
    async with svc.store.write() as conn:
        await conn.execute(access_log.insert(), [
            row(cutoff - 10 * DAY_MS, "req_ancient"), row(cutoff - 1, "req_just_past"),
            row(cutoff, "req_at_boundary"), row(cutoff + 1, "req_just_inside"), row(now, "req_now")])
        # Accounting rows as old as the oldest access-log row: never purged.
        await conn.execute(usage_events.insert().values(
            request_id="req_ancient", tenant_id=tenant, key_id=None, model="m", provider="p", prompt_tokens=1,
            completion_tokens=1, cached_tokens=0, reasoning_tokens=0, cost_micros=3, estimated=False, status=200,
            error_type=None, latency_ms=5, created_at=cutoff - 10 * DAY_MS))


async def snapshot(store: Store) -> dict[str, list[Any]]:
    async with store.read() as conn:
        return {t.name: sorted(map(tuple, (await conn.execute(sa.select(t))).all()), key=repr)
                for t in (usage_events, ledger_entries)}


async def test_purge_removes_exactly_the_rows_past_retention(backend: dict[str, Any],
                                                             make_config: Callable[..., Config]) -> None:
    cfg = make_config(**backend, retention={"access_log_days": 30})
    svc = build(cfg)
    try:
        await svc.store.migrate()
        now = now_ms()
        await seed(svc, now, 30)
        before = await snapshot(svc.store)
        result = await purge_access_log(svc.store, 30, now=now)
        assert result["deleted"] == 2 and result["cutoff_ms"] == cutoff_ms(30, now)
        async with svc.store.read() as conn:
            left = (await conn.execute(sa.select(access_log.c.request_id).order_by(access_log.c.created_at)))
            assert list(left.scalars()) == ["req_at_boundary", "req_just_inside", "req_now"]
        assert await snapshot(svc.store) == before  # usage and ledger untouched
        again = await purge_access_log(svc.store, 30, now=now)
        assert again["deleted"] == 0
        assert await svc.ledger.verify(60_000) == []
    finally:
        await svc.close()


async def test_purge_works_through_a_backlog_in_chunks(make_config: Callable[..., Config],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention, "CHUNK", 3)
    svc = build(make_config())
    try:
        await svc.store.migrate()
        now = now_ms()
        old = [row(now - 40 * DAY_MS + i, f"req_old_{i}") for i in range(10)]
        async with svc.store.write() as conn:
            await conn.execute(access_log.insert(), [*old, row(now, "req_keep")])
        statements = svc.store.queries
        assert (await purge_access_log(svc.store, 30, now=now))["deleted"] == 10
        assert svc.store.queries - statements >= 4  # 3 + 3 + 3 + 1: several short transactions
        async with svc.store.read() as conn:
            assert list((await conn.execute(sa.select(access_log.c.request_id))).scalars()) == ["req_keep"]
    finally:
        await svc.close()


async def test_periodic_purge_survives_errors_and_runs_again(make_config: Callable[..., Config],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    svc = build(make_config())
    await svc.store.migrate()
    async with svc.store.write() as conn:
        await conn.execute(access_log.insert(), [row(now_ms() - 31 * DAY_MS, "req_old")])
    calls = 0

    async def flaky(store: Store, days: int) -> dict[str, object]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database restarting")
        return await purge_access_log(store, days)

    monkeypatch.setattr(retention, "purge_access_log", flaky)
    task = asyncio.create_task(run_periodic_purge(svc.store, 30, every=0.05, first_delay=0))
    try:
        for _ in range(100):
            async with svc.store.read() as conn:
                if not (await conn.execute(sa.select(sa.func.count()).select_from(access_log))).scalar_one():
                    break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the periodic purge did not run again after an error")
        assert calls >= 2 and not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await svc.close()


def test_serving_process_starts_the_periodic_purge(make_config: Callable[..., Config],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tollway.app import create_app

    calls: list[tuple[Any, int]] = []

    async def fake(store: Store, days: int, **_: Any) -> None:
        calls.append((store, days))
        await asyncio.Event().wait()

    monkeypatch.setattr(retention, "run_periodic_purge", fake)
    app = create_app(make_config(retention={"access_log_days": 7}), provider_keys={}, migrate=True)

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await asyncio.sleep(0.05)

    asyncio.run(run())
    assert [days for _, days in calls] == [7]


def test_purge_cli_prints_one_json_object(make_config: Callable[..., Config]) -> None:
    cfg = make_config(retention={"access_log_days": 1})

    async def prepare() -> None:
        svc = build(cfg)
        try:
            await svc.store.migrate()
            async with svc.store.write() as conn:
                await conn.execute(access_log.insert(), [row(now_ms() - 2 * DAY_MS, "req_old"),
                                                         row(now_ms(), "req_new")])
        finally:
            await svc.close()

    asyncio.run(prepare())
    result = subprocess.run([sys.executable, "-m", "tollway", "purge", "--config", cfg.source, "--json"],
                            capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["deleted"] == 1 and out["access_log_days"] == 1 and out["cutoff"].endswith("+00:00")
    human = subprocess.run([sys.executable, "-m", "tollway", "purge", "--config", cfg.source],
                           capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert human.returncode == 0 and human.stdout.startswith("deleted 0 access-log rows older than")
