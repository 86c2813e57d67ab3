"""Live workers: heartbeats, revocation acknowledgements, and the dangling-reservation sweep.

Each serving process registers a row in `workers` and heart-beats it. This gives two
guarantees without any per-request cost:

* Revocation with per-worker key caches (memory://, and each worker's layer in front of
  Redis): `revoke` inserts into `revocations` in the same transaction as the key update,
  then waits until every live worker has acknowledged that sequence number. A worker
  acknowledges only after evicting, and trusts its cache (`fresh()`) only while its
  last committed heartbeat is younger than FRESH. `revoke` skips workers whose
  heartbeat is older than STALE > FRESH, so a worker a revoke skipped never serves from
  its cache before it has read that revocation (the ordering argument is in `poll`). A
  cut-off worker asks Redis or the database instead.
* Reservations record their worker. The sweep releases the reservations of workers
  that are dead: provably gone on this host (their PID no longer runs the process that
  registered), or silent for far longer than a revoke waits: RELEASE_AFTER (60 s by
  default, `server.worker_release_after_seconds`) against STALE (2.5 s). The two
  differ because their mistakes cost differently. A revoke that stops waiting for a
  live worker costs nothing: that worker stopped trusting its cache already. Releasing
  a live worker's reservations hands the money back while its requests still run, so
  the tenant can spend it twice (its late settle then charges only what is left); a
  worker whose event loop is starved (a flood of bad keys, a long sweep, SIGSTOP, a
  VM paused) must not lose its holds for a few seconds of silence. The first test is
  what lets a restarted gateway release its killed predecessor's reservations at once.
  As a backstop, a worker releases its own reservations older than the longest request,
  and so the holds it keeps in memory (ledger/holds.py), unless it still serves their request
  (Ledger.live): a request served is bounded by the relay's deadline, never swept.

The heartbeat runs in a task of its own on a connection of its own (Store.transact_aside),
and the revocation poll reads on that connection too; the sweep runs in a task of its
own, at most SWEEP_BATCH reservations per pass. So neither a busy pool nor a long sweep
delays a heartbeat or a poll.

Heartbeats and reservation ages are written and compared on the database's clock on
PostgreSQL (db_clock), so hosts with skewed clocks still agree on who is silent and what
is old. SQLite's workers all run on one host, whose clock is the database's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from tollway.auth.process_identity import process_identity, provably_dead
from tollway.errors import ServiceUnavailable
from tollway.store.cache import Cache
from tollway.store.db import Store, db_clock, now_ms
from tollway.store.prepared import Prepared
from tollway.store.schema import reservations, revocations, workers

if TYPE_CHECKING:
    from tollway.ledger.transactions import Ledger

POLL = 0.1              # seconds between polls of the revocations table
HEARTBEAT_EVERY = 0.5   # a heartbeat is written at least this often
FRESH = 1.5             # a worker trusts its cache this long after a committed heartbeat
STALE = 2.5             # silent this long: revokes stop waiting for it
RELEASE_AFTER = 60.0    # silent this long: its reservations are released (config: worker_release_after_seconds)
SWEEP_EVERY = 2.0
SWEEP_BATCH = 200       # reservations released per sweep pass; the next pass follows at once
_REVOCATION_LOCK = 0x7265766B  # "revk": any constant, distinct from the migration lock


# The poll's two statements, ten times a second per worker, go through Store.transact and
# Store.statement: on SQLite that is the loop's writer connection, where aiosqlite would
# hand each DBAPI call to its thread and back (~4% of a core for an idle gateway, and GIL
# contention under load); on PostgreSQL the read is one round trip outside a transaction.

_REVOCATIONS_AFTER = Prepared(sa.select(revocations.c.seq, revocations.c.key_hash)
                              .where(revocations.c.seq > sa.bindparam("acked")).order_by(revocations.c.seq))


def _heartbeat(conn: Connection, worker_id: str, acked: int, identity: str | None,
               clock: sa.ColumnElement[int]) -> None:
    done = conn.execute(workers.update().where(workers.c.id == worker_id)
                        .values(acked_seq=acked, heartbeat_at=clock))
    if done.rowcount == 0:
        # A sweep took us for dead after a long stall (and released our open
        # reservations: settle charges those late, see Ledger.settle). Come back.
        conn.execute(workers.insert().values(id=worker_id, acked_seq=acked, heartbeat_at=clock, process=identity))


# --- the revoked hashes a worker remembers ---------------------------------------------------


class RecentRevocations:
    """The key hashes this worker has seen revoked, from the revocations it reads anyway
    (at registration and in every poll), kept at least `keep` seconds: longer than any
    cache entry written before the revocation can stay valid. A Redis hit for one of them
    is refused (keys.py), whether or not Redis still holds the tombstone: Redis may have
    lost it (a restart, a fail-over) or someone who can write to it may have removed it."""

    # An entry's end and a revocation's time come from other hosts' clocks: allow for
    # hosts that disagree by this much.
    _CLOCK_SKEW_MS = 600_000

    def __init__(self) -> None:
        self.keep = 0.0  # seconds; raised by the key cache to what it needs
        self._seen: OrderedDict[str, float] = OrderedDict()

    def add(self, key_hashes: Iterable[str]) -> None:
        now = time.monotonic()
        for h in key_hashes:
            self._seen.pop(h, None)
            self._seen[h] = now
        while self._seen and next(iter(self._seen.values())) < now - self.keep - self._CLOCK_SKEW_MS / 1000:
            self._seen.popitem(last=False)

    def __contains__(self, key_hash: str) -> bool:
        return key_hash in self._seen

    async def read_recent(self, conn: AsyncConnection) -> list[str]:
        """What a worker starting now must remember: it did not poll these."""
        since = now_ms() - int(self.keep * 1000) - self._CLOCK_SKEW_MS
        return list((await conn.execute(
            sa.select(revocations.c.key_hash).where(revocations.c.created_at > since))).scalars().all())


# --- the registry -------------------------------------------------------------------------------


class WorkerRegistry:
    def __init__(self, store: Store, cache: Cache | None, worker_id: str | None, *,
                 release_after: float = RELEASE_AFTER) -> None:
        """worker_id None: a client (the CLI or a test) that publishes but serves nothing.
        cache: the worker's own key cache (memory://, or the layer in front of Redis) that
        revocations are evicted from; None: nothing in this process to evict.
        release_after: seconds of silence before a worker's reservations are released."""
        self.store = store
        self.cache = cache
        self.worker_id = worker_id
        self.identity = process_identity()
        self.release_after = release_after
        self.acked = 0
        # Bumped on every eviction; Keys.authenticate does not cache a lookup that raced one.
        self.generation = 0
        self.revoked = RecentRevocations()
        self._fresh_until = 0.0
        self._beat_started = 0.0  # when the latest committed heartbeat started (monotonic)
        self._last_beat = 0.0
        self._lock = asyncio.Lock()
        self._beat_lock = asyncio.Lock()  # one heartbeat at a time on its one connection
        self._heartbeats: asyncio.Task[None] | None = None
        # No worker is taken for dead before this (monotonic): set while our own
        # heartbeats fail, so that after a database outage the others have time to come back.
        self._sweep_not_before = 0.0

    # --- used by revoke ---------------------------------------------------------------------

    async def publish(self, conn: AsyncConnection, key_hash: str) -> int:
        """Record a revocation inside the caller's transaction; returns its sequence number."""
        if not self.store.is_sqlite:
            # Workers read "seq > acked", so revocations must commit in seq order. PostgreSQL
            # hands out serial values at insert time and two revokes could commit out of
            # order (a worker would then ack past the slower one); this lock, held until
            # commit, serialises them. (SQLite writers are serialised already.)
            await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_REVOCATION_LOCK)))
        result = await conn.execute(
            revocations.insert().values(key_hash=key_hash, created_at=now_ms()).returning(revocations.c.seq))
        return int(result.scalar_one())

    async def wait_for(self, seq: int, limit_seconds: float = 10.0) -> None:
        """Return once every live worker has evicted revocation `seq`."""
        if self.worker_id is not None:
            await self.poll()  # our own cache first: the common single-process case is instant
        deadline = time.monotonic() + limit_seconds
        while True:
            async with self.store.read() as conn:
                behind = (await conn.execute(
                    sa.select(workers.c.process)
                    .where(workers.c.acked_seq < seq,
                           workers.c.heartbeat_at > db_clock(self.store) - int(STALE * 1000))
                )).scalars().all()
            # A worker killed moments ago still looks live by its heartbeat; do not wait for it.
            if all(provably_dead(process, self.identity) for process in behind):
                return
            if time.monotonic() > deadline:
                raise ServiceUnavailable("The revocation is recorded, but not every worker has confirmed it yet; "
                                         "retry the revoke.")
            await asyncio.sleep(POLL / 2)

    def fresh(self) -> bool:
        """May this worker trust its key cache? Only while a revoke would wait for it."""
        return time.monotonic() < self._fresh_until

    # --- the worker's own loop ------------------------------------------------------------------

    async def register(self) -> None:
        assert self.worker_id is not None
        started = time.monotonic()
        async with self.store.write() as conn:
            latest = sa.select(sa.func.coalesce(sa.func.max(revocations.c.seq), 0))
            self.acked = int((await conn.execute(latest)).scalar_one())
            self.revoked.add(await self.revoked.read_recent(conn))
            await conn.execute(workers.insert().values(
                id=self.worker_id, acked_seq=self.acked, heartbeat_at=db_clock(self.store), process=self.identity))
        # The cache starts empty, so everything up to `acked` is trivially evicted.
        self._beat_started = self._last_beat = started
        self._fresh_until = started + FRESH

    async def poll(self) -> None:
        """Heartbeat (if due), then read and evict new revocations, then acknowledge them.

        Why a revoke cannot skip a worker that still trusts a stale entry: the heartbeat is
        committed before the revocations are read, and the cache is trusted only until
        FRESH after that heartbeat started. A revocation committed after our read finds
        our heartbeat younger than FRESH < STALE whenever we still trust the cache, so
        the revoke waits for our acknowledgement, which we write only after evicting."""
        async with self._lock:
            if time.monotonic() - self._last_beat >= HEARTBEAT_EVERY:
                await self._beat()
            # The heartbeat task commits beats concurrently; only one committed before the
            # read below may extend trust (a later one may have missed a revocation the read saw not).
            committed = self._beat_started
            if self.cache is not None:
                # Off the pool, like the heartbeat: a burst of requests must not stop the polls.
                rows = await self.store.statement_aside(_REVOCATIONS_AFTER, {"acked": self.acked})
                if rows:
                    self.revoked.add(h for _, h in rows)
                    await self.cache.delete(*[f"k:{h}" for _, h in rows])
                    self.generation += 1
                    self.acked = int(rows[-1][0])
                    await self._beat()  # acknowledge now: a revoke is waiting for it
            self._fresh_until = committed + FRESH

    async def _beat(self) -> None:
        assert self.worker_id is not None
        async with self._beat_lock:
            started = time.monotonic()
            await self.store.transact_aside(_heartbeat, self.worker_id, self.acked, self.identity,
                                            db_clock(self.store))
            self._beat_started = self._last_beat = max(self._beat_started, started)

    async def heartbeat_forever(self) -> None:
        """The heartbeat's own task: a poll waiting for the pool, or a sweep, cannot delay it."""
        from tollway.telemetry import log

        failing = False
        while True:
            try:
                await self._beat()
                failing = False
            except Exception as exc:  # a database outage: fresh() expires meanwhile
                if not failing:
                    log.warning("heartbeat_failed", worker_id=self.worker_id, exc_type=type(exc).__name__)
                failing = True
                # Every worker went silent with the database: take nobody for dead until
                # the others have had STALE seconds to heart-beat again.
                self._sweep_not_before = time.monotonic() + STALE
            # A little more often than HEARTBEAT_EVERY, so that poll() seldom finds one due.
            await asyncio.sleep(HEARTBEAT_EVERY * 0.8)

    def start_heartbeats(self) -> None:
        if self._heartbeats is None:
            self._heartbeats = asyncio.create_task(self.heartbeat_forever())

    async def run(self, ledger: Ledger, max_request_ms: int, sweep_every: float = SWEEP_EVERY) -> None:
        """Poll for revocations; the heartbeat and the sweep run in tasks of their own, so
        neither a sweep waiting for the pool nor a long one delays a poll or a heartbeat."""
        from tollway.telemetry import log

        self.start_heartbeats()
        sweeping = asyncio.create_task(self._sweep_forever(ledger, max_request_ms, sweep_every))
        failing = False
        try:
            while True:
                try:
                    await self.poll()
                    failing = False
                except Exception as exc:  # a database outage: retry; fresh() expires meanwhile
                    if not failing:
                        log.warning("worker_loop_error", worker_id=self.worker_id, exc_type=type(exc).__name__)
                    failing = True
                    self._sweep_not_before = max(self._sweep_not_before, time.monotonic() + STALE)
                await asyncio.sleep(POLL)
        finally:
            sweeping.cancel()
            with contextlib.suppress(BaseException):
                await sweeping

    async def _sweep_forever(self, ledger: Ledger, max_request_ms: int, sweep_every: float) -> None:
        from tollway.telemetry import log

        next_sweep = time.monotonic() + sweep_every  # start() has just swept
        failing = False
        while True:
            await asyncio.sleep(max(POLL, max(next_sweep, self._sweep_not_before) - time.monotonic()))
            try:
                released = await self._sweep(ledger, max_request_ms)
                # A full batch leaves more: the next pass follows at once.
                next_sweep = time.monotonic() + (0 if released >= SWEEP_BATCH else sweep_every)
                failing = False
            except Exception as exc:  # a database outage: retry after the others had time to come back
                if not failing:
                    log.warning("sweep_failed", worker_id=self.worker_id, exc_type=type(exc).__name__)
                failing = True
                next_sweep = time.monotonic() + sweep_every
                self._sweep_not_before = max(self._sweep_not_before, time.monotonic() + STALE)

    async def _sweep(self, ledger: Ledger, max_request_ms: int) -> int:
        return await sweep(self.store, ledger, max_request_ms, self.identity, self.worker_id,
                           release_after_ms=int(self.release_after * 1000))

    async def start(self, ledger: Ledger, max_request_ms: int) -> int:
        """Register and start heart-beating, then release what dead predecessors left
        reserved before serving."""
        from tollway.telemetry import log

        await self.register()
        self.start_heartbeats()
        released = 0
        try:
            while True:
                batch = await self._sweep(ledger, max_request_ms)
                released += batch
                if batch < SWEEP_BATCH:
                    break
        except Exception as exc:  # never keep the gateway down: the periodic sweep retries
            log.warning("startup_sweep_failed", worker_id=self.worker_id, exc_type=type(exc).__name__)
        if released:
            log.info("startup_sweep", worker_id=self.worker_id, released=released)
        return released

    async def unregister(self) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            with contextlib.suppress(BaseException):
                await self._heartbeats
            self._heartbeats = None
        with contextlib.suppress(Exception):
            async with self.store.write() as conn:
                await conn.execute(workers.delete().where(workers.c.id == self.worker_id))


async def dead_workers(store: Store, identity: str | None = None, me: str | None = None,
                       release_after_ms: int = int(RELEASE_AFTER * 1000)) -> list[str]:
    """Workers silent for longer than `release_after_ms`, or provably gone on this host."""
    silent, gone = await _dead(store, identity, me, release_after_ms)
    return sorted(silent | gone)


async def _dead(store: Store, identity: str | None, me: str | None, release_after_ms: int
                ) -> tuple[set[str], set[str]]:
    """(silent for longer than release_after_ms, provably gone)"""
    is_silent = workers.c.heartbeat_at <= db_clock(store) - release_after_ms
    async with store.read() as conn:
        rows = (await conn.execute(
            sa.select(workers.c.id, workers.c.process, is_silent.label("silent")))).all()
    others = [(wid, process, bool(quiet)) for wid, process, quiet in rows if wid != me]
    return ({wid for wid, _, quiet in others if quiet},
            {wid for wid, process, _ in others if provably_dead(process, identity)})


async def sweep(store: Store, ledger: Ledger, max_request_ms: int, identity: str | None = None,
                me: str | None = None, *, release_after_ms: int = int(RELEASE_AFTER * 1000),
                batch: int = SWEEP_BATCH) -> int:
    """Release up to `batch` reservations of dead workers, of workers no longer registered,
    and any older than the longest request. Policy: released in full, never charged
    (Tollway never saw the outcome); entries are recorded as `<request>:swept`; a settle
    that still comes charges then, once (Ledger._settle_late). Ages are compared on the
    clock they were written on (db_clock).

    A worker taken for dead that comes back registers again with its next heartbeat; a
    reservation it makes in between names a worker that is not registered, so those are
    released only once older than `release_after_ms`, as a silent worker's are."""
    silent, gone = await _dead(store, identity, me, release_after_ms)
    dead = sorted(silent | gone)
    now = db_clock(store)
    # Silence checked again in the same statement: a worker that came back since does not
    # lose the holds of the requests it serves now.
    still_silent = sa.select(workers.c.id).where(workers.c.id.in_(sorted(silent)),
                                                 workers.c.heartbeat_at <= now - release_after_ms)
    too_old = reservations.c.created_at < now - max_request_ms
    if me is not None:
        # Only the worker serving a request knows whether it still does: by age, each
        # worker releases its own (and those of no worker); another live worker's are left
        # to it, a dead one's go by the conditions below.
        too_old = sa.and_(too_old, sa.or_(reservations.c.worker_id.is_(None), reservations.c.worker_id == me))
    async with store.read() as conn:
        ids = (await conn.execute(
            sa.select(reservations.c.request_id).where(sa.or_(
                too_old,
                reservations.c.worker_id.in_(sorted(gone)) if gone else sa.false(),
                reservations.c.worker_id.in_(still_silent) if silent else sa.false(),
                sa.and_(reservations.c.worker_id.is_not(None),
                        reservations.c.worker_id.not_in(sa.select(workers.c.id)),
                        reservations.c.created_at < now - release_after_ms),
            )).order_by(reservations.c.created_at).limit(batch))).scalars().all()
    # Never a request this process still serves (Ledger.live).
    released = await ledger.release_swept([rid for rid in ids if rid not in ledger.live])
    if len(ids) < batch:
        released += await ledger.release_stale_in_memory(max_request_ms)
        if dead:  # all their reservations are released: forget them, unless a silent one came back meanwhile
            async with store.write() as conn:
                await conn.execute(workers.delete().where(workers.c.id.in_(dead), sa.or_(
                    workers.c.id.in_(sorted(gone)) if gone else sa.false(),
                    workers.c.heartbeat_at <= db_clock(store) - release_after_ms)))
    return released
