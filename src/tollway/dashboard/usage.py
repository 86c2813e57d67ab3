"""The usage page: per day and per model (requests, tokens, cost), a server-rendered SVG
chart, a date range, the same rows as CSV, and recent requests (metadata only: usage
rows hold no content, privacy.py).

Reads only, outside any transaction the request path takes; it does not hurry the charge
journal either (its charges reach the tables within ~10 ms). Speed with a million rows:
bench/dashboard_usage.py prints the time; docs/dashboard.md has the numbers.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import Response

from tollway.errors import NotFound
from tollway.money import format_usd
from tollway.store.db import Store
from tollway.store.schema import usage_daily, usage_events

from .rollup import DAY_MS, Rollup
from .web import Web

DEFAULT_DAYS = 30
MAX_DAYS = 366
RECENT = 50
CHART_W, CHART_H = 720, 180

_DAY = (usage_events.c.created_at // DAY_MS).label("day")


@dataclass(frozen=True)
class Range:
    start: date
    end: date      # inclusive
    problem: str | None = None

    @property
    def start_ms(self) -> int:
        return int(datetime(self.start.year, self.start.month, self.start.day, tzinfo=UTC).timestamp() * 1000)

    @property
    def end_ms(self) -> int:  # exclusive
        return self.start_ms + ((self.end - self.start).days + 1) * DAY_MS


def parse_range(params: Any, today: date | None = None) -> Range:
    today = today or datetime.now(UTC).date()
    default = Range(today - timedelta(days=DEFAULT_DAYS - 1), today)
    raw_from, raw_to = params.get("from", ""), params.get("to", "")
    if not raw_from and not raw_to:
        return default
    try:
        start = date.fromisoformat(raw_from) if raw_from else default.start
        end = date.fromisoformat(raw_to) if raw_to else today
    except ValueError:
        return Range(default.start, default.end, "Dates look like 2026-12-01.")
    if end < start:
        return Range(default.start, default.end, "The start date must not be after the end date.")
    if (end - start).days >= MAX_DAYS:
        return Range(end - timedelta(days=MAX_DAYS - 1), end, f"Showing the last {MAX_DAYS} days of the range.")
    return Range(start, end)


async def daily(rollup: Rollup, tenant_id: str, rng: Range) -> list[dict[str, Any]]:
    """One row per (day, model), newest day first: folded totals for days that are over,
    raw rows for the rest (rollup.py)."""
    folded_until = await rollup.folded_until()
    split = min(max(rng.start_ms, folded_until), rng.end_ms)
    totals: dict[tuple[int, str], list[int]] = {}
    async with rollup.store.read() as conn:
        if split > rng.start_ms:
            for d, m, *sums in await conn.execute(
                    sa.select(usage_daily.c.day, usage_daily.c.model, *(sa.func.sum(usage_daily.c[n]) for n in _COLS))
                    .where(usage_daily.c.tenant_id == tenant_id, usage_daily.c.day >= rng.start_ms // DAY_MS,
                           usage_daily.c.day < split // DAY_MS)
                    .group_by(usage_daily.c.day, usage_daily.c.model)):
                _add(totals, (int(d), m), sums)
        if split < rng.end_ms:
            for d, m, *sums in await conn.execute(
                    sa.select(_DAY, usage_events.c.model, sa.func.count(),
                              *(sa.func.sum(usage_events.c[n]) for n in _COLS[1:]))
                    .where(usage_events.c.tenant_id == tenant_id, rollup.rows_between(split, rng.end_ms))
                    .group_by(_DAY, usage_events.c.model)):
                _add(totals, (int(d), m), sums)
    return [{"day": (date(1970, 1, 1) + timedelta(days=d)).isoformat(), "model": m,
             **dict(zip(_COLS, v, strict=True))}
            for (d, m), v in sorted(totals.items(), key=lambda kv: (-kv[0][0], kv[0][1]))]


_COLS = ("requests", "prompt_tokens", "completion_tokens", "cost_micros")


def _add(totals: dict[tuple[int, str], list[int]], key: tuple[int, str], sums: Any) -> None:
    acc = totals.setdefault(key, [0, 0, 0, 0])
    for i, v in enumerate(sums):
        acc[i] += int(v or 0)


async def recent(store: Store, tenant_id: str, limit: int = RECENT) -> list[dict[str, Any]]:
    """The newest requests, through the (tenant_id, request_id) index (ids grow with time)."""
    cols = [usage_events.c[n] for n in ("request_id", "created_at", "model", "status", "prompt_tokens",
                                         "completion_tokens", "cost_micros", "estimated", "latency_ms")]
    async with store.read() as conn:
        rows = (await conn.execute(sa.select(*cols).where(usage_events.c.tenant_id == tenant_id)
                                   .order_by(usage_events.c.request_id.desc()).limit(limit))).mappings().all()
    return [dict(r) for r in rows]


def chart(rows: list[dict[str, Any]], rng: Range) -> dict[str, Any]:
    """Bars of cost per day across the range (days without use are zero-height bars)."""
    per_day: dict[str, int] = {}
    for r in rows:
        per_day[r["day"]] = per_day.get(r["day"], 0) + r["cost_micros"]
    days = [(rng.start + timedelta(days=i)).isoformat() for i in range((rng.end - rng.start).days + 1)]
    top = max(per_day.values(), default=0)
    slot = CHART_W / max(1, len(days))
    bars = []
    for i, d in enumerate(days):
        value = per_day.get(d, 0)
        h = 0.0 if not top else max(1.0, (CHART_H - 20) * value / top) if value else 0.0
        bars.append({"x": round(i * slot + slot * 0.15, 2), "w": round(max(1.0, slot * 0.7), 2),
                     "y": round(CHART_H - h, 2), "h": round(h, 2), "day": d, "cost_micros": value})
    return {"width": CHART_W, "height": CHART_H, "bars": bars, "top_micros": top,
            "first": days[0], "last": days[-1]}


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["day", "model", "requests", "prompt_tokens", "completion_tokens", "cost_usd"])
    for r in rows:
        writer.writerow([r["day"], _safe_cell(r["model"]), r["requests"], r["prompt_tokens"],
                         r["completion_tokens"], format_usd(r["cost_micros"])])
    return out.getvalue()


def _safe_cell(text: str) -> str:
    # A cell starting with = + - @ runs as a formula in spreadsheets (OWASP CSV injection).
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class Usage:
    def __init__(self, web: Web, rollup: Rollup) -> None:
        self.web = web
        self.store = web.svc.store
        self.rollup = rollup

    async def page(self, request: Request, tenant: dict[str, Any]) -> Response:
        rng = parse_range(request.query_params)
        rows = await daily(self.rollup, tenant["id"], rng)
        totals = {k: sum(r[k] for r in rows) for k in ("requests", "prompt_tokens", "completion_tokens",
                                                      "cost_micros")}
        return self.web.render(request, "usage.html", tenant=tenant, rng=rng, rows=rows, totals=totals,
                               chart=chart(rows, rng), recent=await recent(self.store, tenant["id"]))

    async def csv(self, request: Request, tenant: dict[str, Any]) -> Response:
        rng = parse_range(request.query_params)
        body = to_csv(await daily(self.rollup, tenant["id"], rng))
        name = f"tollway-usage-{rng.start.isoformat()}-{rng.end.isoformat()}.csv"
        return Response(body, media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="{name}"'})

    async def request(self, request: Request, tenant: dict[str, Any]) -> Response:
        cols = [c for c in usage_events.c if c.name not in ("tenant_id",)]
        async with self.store.read() as conn:
            row = (await conn.execute(sa.select(*cols).where(
                usage_events.c.request_id == request.path_params["request_id"],
                usage_events.c.tenant_id == tenant["id"]))).mappings().first()
        if row is None:
            raise NotFound("no such request")
        return self.web.render(request, "request.html", tenant=tenant, row=dict(row))
