"""Daily usage totals for the dashboard, kept on the read side.

Summing a million usage rows took SQLite ~1.1 s (bench/dashboard_usage.py), far over
the usage page's 300 ms. So days that are over are summed once, in the background, into
`usage_daily` (tenant, day, key, model -> requests, tokens, cost); a page sums those and
reads raw rows only for the days not yet folded (today), found through the (tenant_id,
request_id) index: request ids begin with the arrival time, and a row's `created_at` (its
settle time) is at most the longest request after that.

Nothing is added to the request path. Folding reads in a read transaction (WAL readers
do not block writers; PostgreSQL readers never block) and writes the few total rows in
one short transaction. A day is folded 10 minutes after it ends (SETTLED_WITHIN_MS). A
charge written later than that (a charge journal recovered at the next start after a
crash) is in the ledger, the export and the recent requests, but not in these totals.
Workers may fold at the same time: the one whose write lands first wins; the other's
primary-key conflict rolls it back whole.
"""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc

from tollway.store.db import Store, now_ms
from tollway.store.schema import usage_daily, usage_events, usage_rollup
from tollway.telemetry import log

DAY_MS = 86_400_000
FOLD_EVERY_SECONDS = 600
# A usage row's created_at is taken when its charge is written: it is committed moments
# later (a transaction, or the charge journal's 10 ms). A day is folded only once it has
# been over for this long, so no row of it can still be on its way.
SETTLED_WITHIN_MS = 10 * 60_000
_DAY = (usage_events.c.created_at // DAY_MS).label("day")
_SUMS = (sa.func.count().label("requests"), sa.func.sum(usage_events.c.prompt_tokens).label("prompt_tokens"),
         sa.func.sum(usage_events.c.completion_tokens).label("completion_tokens"),
         sa.func.sum(usage_events.c.cost_micros).label("cost_micros"))


def request_id_at(ms: int) -> str:
    """The smallest request id issued at `ms` (edge.new_request_id: req_ + 12 hex digits of ms)."""
    return f"req_{max(ms, 0):012x}"


class Rollup:
    def __init__(self, store: Store, longest_request_ms: int) -> None:
        self.store = store
        self.margin = longest_request_ms  # created_at - arrival time is at most this

    async def folded_until(self) -> int:
        async with self.store.read() as conn:
            return int((await conn.execute(sa.select(usage_rollup.c.folded_until)
                                           .where(usage_rollup.c.id == 1))).scalar() or 0)

    def rows_between(self, start_ms: int, end_ms: int) -> Any:
        """WHERE clause for usage rows with created_at in [start, end), as an index range."""
        return sa.and_(usage_events.c.request_id >= request_id_at(start_ms - self.margin),
                       usage_events.c.request_id < request_id_at(end_ms),
                       usage_events.c.created_at >= start_ms, usage_events.c.created_at < end_ms)

    async def fold(self, at_ms: int | None = None) -> int:
        """Sum the finished days not folded yet; returns how many total rows it wrote."""
        until = ((at_ms or now_ms()) - SETTLED_WITHIN_MS) // DAY_MS * DAY_MS
        start = await self.folded_until()
        if until <= start:
            return 0
        key = sa.func.coalesce(usage_events.c.key_id, "").label("key_id")
        async with self.store.read() as conn:
            totals = [dict(r) for r in (await conn.execute(
                sa.select(usage_events.c.tenant_id, _DAY, key, usage_events.c.model, *_SUMS)
                .where(self.rows_between(start, until))
                .group_by(usage_events.c.tenant_id, _DAY, key, usage_events.c.model))).mappings().all()]
        try:
            async with self.store.write() as conn:
                now = (await conn.execute(sa.select(usage_rollup.c.folded_until)
                                          .where(usage_rollup.c.id == 1))).scalar()
                if int(now or 0) != start:
                    return 0  # another worker folded meanwhile
                if totals:
                    await conn.execute(usage_daily.insert(), totals)
                if now is None:
                    await conn.execute(usage_rollup.insert().values(id=1, folded_until=until))
                else:
                    await conn.execute(usage_rollup.update().where(usage_rollup.c.id == 1)
                                       .values(folded_until=until))
        except sa.exc.IntegrityError:
            return 0
        return len(totals)

    async def run(self) -> None:
        """Fold now, then every FOLD_EVERY_SECONDS, for as long as the process serves."""
        while True:
            try:
                count = await self.fold()
                if count:
                    log.info("usage_folded", count=count)
            except Exception as exc:  # a database outage: try again next time
                log.warning("usage_fold_failed", exc_type=type(exc).__name__)
            await asyncio.sleep(FOLD_EVERY_SECONDS)

