"""Access-log retention: rows older than retention.access_log_days are deleted.

Only the access log expires. Usage events and ledger entries are accounting records and
are kept (a tenant's deletion pseudonymises them instead; see tenants.py).

`tollway purge` runs it once; every serving process also runs it every PURGE_EVERY
seconds (the first run a short, random delay after start, so N workers do not all purge
at the same moment; a purge that finds nothing to do costs one indexed query). Rows go
in chunks of CHUNK, each its own short transaction, so a first purge of a large backlog
never holds SQLite's single write lock for long. SQLite runs with secure_delete on, so
purged IP addresses are overwritten in the database file, not left in free pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from datetime import UTC, datetime

import sqlalchemy as sa

from tollway import telemetry
from tollway.store.db import Store, now_ms
from tollway.store.schema import access_log

DAY_MS = 86_400_000
CHUNK = 5_000
PURGE_EVERY = 3_600.0


def cutoff_ms(days: int, now: int | None = None) -> int:
    """Rows created strictly before this instant are past retention."""
    return (now if now is not None else now_ms()) - days * DAY_MS


async def purge_access_log(store: Store, days: int, *, now: int | None = None) -> dict[str, object]:
    """Delete access-log rows older than `days` days; returns what was done."""
    if days <= 0:
        raise ValueError("retention.access_log_days must be positive")
    cutoff = cutoff_ms(days, now)
    deleted = 0
    while True:
        async with store.write() as conn:
            ids = sa.select(access_log.c.id).where(access_log.c.created_at < cutoff).limit(CHUNK)
            result = await conn.execute(access_log.delete().where(access_log.c.id.in_(ids.scalar_subquery())))
        n = int(result.rowcount or 0)
        deleted += n
        if n < CHUNK:
            break
    return {"deleted": deleted, "access_log_days": days, "cutoff_ms": cutoff,
            "cutoff": datetime.fromtimestamp(cutoff / 1000, UTC).isoformat()}


async def run_periodic_purge(store: Store, days: int, every: float = PURGE_EVERY,
                             first_delay: float | None = None) -> None:
    """The serving loop's purge; errors are logged and retried at the next tick."""
    await asyncio.sleep(first_delay if first_delay is not None else random.uniform(5.0, 60.0))
    while True:
        try:
            result = await purge_access_log(store, days)
            if result["deleted"]:
                telemetry.log.info("access_log_purged", count=result["deleted"])
        except Exception:
            with contextlib.suppress(Exception):
                telemetry.log.warning("access_log_purge_failed", exc_info=True)
        await asyncio.sleep(every)
