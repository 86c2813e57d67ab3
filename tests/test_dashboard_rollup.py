"""The usage page's daily totals (dashboard/rollup.py): folded days plus live rows give
exactly what summing the raw rows gives, on both stacks; a fold happens once; deleting a
tenant erases its totals."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from tollway import dashboard
from tollway.config import Config
from tollway.dashboard.rollup import DAY_MS, SETTLED_WITHIN_MS
from tollway.dashboard.usage import Range, daily
from tollway.services import Services, build
from tollway.store.db import now_ms
from tollway.store.schema import usage_daily, usage_events

MODELS = ("acme/a", "acme/b")


def _row(tenant_id: str, at: int, i: int, key_id: str | None) -> dict[str, Any]:
    return {"request_id": f"req_{at:012x}{secrets.token_hex(8)}", "tenant_id": tenant_id, "key_id": key_id,
            "model": MODELS[i % 2], "provider": "p", "prompt_tokens": 10 + i, "completion_tokens": 5 + i,
            "cached_tokens": 0, "reasoning_tokens": 0, "cost_micros": 1_000 + i, "estimated": False, "status": 200,
            "error_type": None, "latency_ms": 5, "created_at": at}


async def _raw(svc: Services, tenant_id: str, rng: Range) -> list[dict[str, Any]]:
    day = (usage_events.c.created_at // DAY_MS).label("d")
    async with svc.store.read() as conn:
        rows = (await conn.execute(
            sa.select(day, usage_events.c.model, sa.func.count(), sa.func.sum(usage_events.c.prompt_tokens),
                      sa.func.sum(usage_events.c.completion_tokens), sa.func.sum(usage_events.c.cost_micros))
            .where(usage_events.c.tenant_id == tenant_id, usage_events.c.created_at >= rng.start_ms,
                   usage_events.c.created_at < rng.end_ms)
            .group_by(day, usage_events.c.model).order_by(day.desc(), usage_events.c.model))).all()
    return [{"day": (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=int(d))).date().isoformat(), "model": m,
             "requests": int(n), "prompt_tokens": int(p), "completion_tokens": int(c), "cost_micros": int(x)}
            for d, m, n, p, c, x in rows]


async def test_folded_and_live_totals_equal_the_raw_sums(backend: dict[str, Any],
                                                         make_config: Callable[..., Config]) -> None:
    svc = build(make_config(**backend))
    try:
        await svc.store.migrate()
        tenant = (await svc.tenants.create(name="Ada"))["tenant_id"]
        other = (await svc.tenants.create(name="Grace"))["tenant_id"]
        now = now_ms()
        rows = [_row(t, now - (i * 7_919_000) % (40 * DAY_MS), i, "key_x" if i % 3 else None)
                for t in (tenant, other) for i in range(400)]
        async with svc.store.write() as conn:
            await conn.execute(usage_events.insert(), rows)
        totals = dashboard.rollup(svc)
        today = datetime.now(UTC).date()
        ranges = [Range(today - timedelta(days=29), today),
                  Range(today - timedelta(days=39), today - timedelta(days=3)), Range(today, today)]
        before = [await daily(totals, tenant, r) for r in ranges]
        assert before == [await _raw(svc, tenant, r) for r in ranges] and before[0]
        assert await totals.fold() > 0
        assert await totals.fold() == 0  # each finished day is folded once
        assert await totals.folded_until() == (now - SETTLED_WITHIN_MS) // DAY_MS * DAY_MS
        assert [await daily(totals, tenant, r) for r in ranges] == before
        await svc.tenants.delete(tenant)
        async with svc.store.read() as conn:
            left = (await conn.execute(sa.select(usage_daily.c.tenant_id).distinct())).scalars().all()
        assert list(left) == [other]
    finally:
        await svc.close()
