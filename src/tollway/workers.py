"""Live workers: heartbeats, revocation acknowledgements, and the dangling-reservation sweep.

Each serving process registers a row in `workers` and heart-beats it. This gives two
guarantees without any per-request cost:

* Revocation with per-worker (memory://) caches: `revoke` inserts into `revocations`
  in the same transaction as the key update, then waits until every live worker has
  acknowledged that sequence number. Workers poll every POLL seconds and evict. A worker
  whose last successful poll+heartbeat is older than FRESH seconds stops trusting its
  cache (`fresh()` is False) and asks the database, so a worker that is cut off can never
  serve a revoked key; `revoke` stops waiting on workers silent for longer than STALE.
* Reservations record their worker. The sweep releases the reservations of workers
  that stopped heart-beating (crash, SIGKILL) and, as a backstop, any reservation older
  than the longest request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tollway.errors import ServiceUnavailable
from tollway.store.cache import Cache
from tollway.store.db import Store, now_ms
from tollway.store.schema import reservations, revocations, workers

if TYPE_CHECKING:
    from tollway.ledger import Ledger

POLL = 0.1
FRESH = 1.5
STALE = 2.5
HEARTBEAT_EVERY = 0.5


class WorkerRegistry:
    def __init__(self, store: Store, cache: Cache | None, worker_id: str | None) -> None:
        """worker_id None: a client (the CLI or a test) that publishes but serves nothing."""
        self.store = store
        self.cache = cache
        self.worker_id = worker_id
        self.acked = 0
        self._fresh_until = 0.0
        self._last_beat = 0.0

    # --- used by revoke ---------------------------------------------------------------------

    async def publish(self, conn: AsyncConnection, key_hash: str) -> int:
        result = await conn.execute(
            revocations.insert().values(key_hash=key_hash, created_at=now_ms()).returning(revocations.c.seq))
        return int(result.scalar_one())

    async def wait_for(self, seq: int, limit_seconds: float = 10.0) -> None:
        if self.worker_id is not None:
            await self.poll()  # our own cache first: the common single-process case is instant
        deadline = time.monotonic() + limit_seconds
        while True:
            async with self.store.read() as conn:
                behind = (await conn.execute(
                    sa.select(sa.func.count()).select_from(workers)
                    .where(workers.c.acked_seq < seq, workers.c.heartbeat_at > now_ms() - int(STALE * 1000))
                )).scalar_one()
            if not behind:
                return
            if time.monotonic() > deadline:
                raise ServiceUnavailable("revocation was recorded but not every worker confirmed it yet")
            await asyncio.sleep(POLL / 2)

    def fresh(self) -> bool:
        return time.monotonic() < self._fresh_until

    # --- the worker's own loop ------------------------------------------------------------------

    async def register(self) -> None:
        assert self.worker_id is not None
        async with self.store.write() as conn:
            latest = sa.select(sa.func.coalesce(sa.func.max(revocations.c.seq), 0))
            self.acked = int((await conn.execute(latest)).scalar_one())
            await conn.execute(workers.insert().values(id=self.worker_id, acked_seq=self.acked, heartbeat_at=now_ms()))
        self._fresh_until = time.monotonic() + FRESH
        self._last_beat = time.monotonic()

    async def poll(self) -> None:
        started = time.monotonic()
        async with self.store.read() as conn:
            rows = (await conn.execute(
                sa.select(revocations.c.seq, revocations.c.key_hash).where(revocations.c.seq > self.acked)
                .order_by(revocations.c.seq))).all()
        if rows and self.cache is not None:
            await self.cache.delete(*[f"k:{h}" for _, h in rows])
        new_acked = rows[-1][0] if rows else self.acked
        if new_acked != self.acked or started - self._last_beat >= HEARTBEAT_EVERY:
            async with self.store.write() as conn:
                await conn.execute(workers.update().where(workers.c.id == self.worker_id)
                                   .values(acked_seq=new_acked, heartbeat_at=now_ms()))
            self.acked = new_acked
            self._last_beat = started
        self._fresh_until = started + FRESH

    async def run(self, ledger: Ledger, max_request_ms: int, sweep_every: float = 5.0) -> None:
        next_sweep = 0.0
        while True:
            with contextlib.suppress(Exception):  # a database outage: retry; fresh() expires meanwhile
                await self.poll()
                if time.monotonic() >= next_sweep:
                    await sweep(self.store, ledger, max_request_ms)
                    next_sweep = time.monotonic() + sweep_every
            await asyncio.sleep(POLL)

    async def unregister(self) -> None:
        with contextlib.suppress(Exception):
            async with self.store.write() as conn:
                await conn.execute(workers.delete().where(workers.c.id == self.worker_id))


async def dead_workers(store: Store) -> list[str]:
    async with store.read() as conn:
        silent = sa.select(workers.c.id).where(workers.c.heartbeat_at <= now_ms() - int(STALE * 1000))
        return list((await conn.execute(silent)).scalars().all())


async def sweep(store: Store, ledger: Ledger, max_request_ms: int) -> int:
    """Release reservations of dead workers, and any older than the longest request."""
    dead = await dead_workers(store)
    ids = set(await ledger.open_reservations(older_than_ms=max_request_ms))
    if dead:
        ids |= set(await ledger.open_reservations(worker_ids=dead))
    async with store.read() as conn:
        # Held by a worker whose row is gone (it unregistered, or another sweep removed it).
        orphans = (await conn.execute(
            sa.select(reservations.c.request_id).where(
                reservations.c.worker_id.is_not(None),
                reservations.c.worker_id.not_in(sa.select(workers.c.id))))).scalars().all()
    ids |= set(orphans)
    released = 0
    for rid in sorted(ids):
        if await ledger.settle(rid, 0) is not None:
            released += 1
    if dead:
        async with store.write() as conn:
            await conn.execute(workers.delete().where(workers.c.id.in_(dead)))
    return released
