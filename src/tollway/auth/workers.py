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
  that are dead: silent for longer than STALE, or, on the same host, provably gone
  (their PID no longer runs the process that registered). The second test is what
  lets a restarted gateway release its killed predecessor's reservations at once.
  As a backstop, a worker releases its own reservations older than the longest request,
  and so the holds it keeps in memory (ledger/holds.py), unless it still serves their request
  (Ledger.live): a request served is bounded by the relay's deadline, never swept.

Heartbeats and staleness use the database's clock on PostgreSQL, so workers on hosts
with skewed clocks still agree on who is silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from tollway.errors import ServiceUnavailable
from tollway.store.cache import Cache
from tollway.store.db import Store, now_ms
from tollway.store.prepared import Prepared
from tollway.store.schema import reservations, revocations, workers

if TYPE_CHECKING:
    from tollway.ledger.transactions import Ledger

POLL = 0.1              # seconds between polls of the revocations table
HEARTBEAT_EVERY = 0.5   # a heartbeat is written at least this often
FRESH = 1.5             # a worker trusts its cache this long after a committed heartbeat
STALE = 2.5             # silent this long: revokes stop waiting for it, its reservations are swept
SWEEP_EVERY = 2.0
_REVOCATION_LOCK = 0x7265766B  # "revk": any constant, distinct from the migration lock


def db_clock(store: Store) -> sa.ColumnElement[int]:
    """Now, in epoch milliseconds, by the database's clock (PostgreSQL) or this host's (SQLite)."""
    if store.is_sqlite:
        return sa.literal(now_ms(), sa.BigInteger)
    epoch = sa.extract("epoch", sa.func.clock_timestamp())
    return sa.cast(sa.func.floor(epoch * 1000), sa.BigInteger)


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


# --- telling for certain that a process is gone ------------------------------------------------


def _start_ticks(pid: int) -> str | None:
    """The start time of a running process (clock ticks since boot), None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22 of proc(5); fields[0] is field 3


def process_identity() -> str | None:
    """boot id | PID namespace | pid | start time; None where /proc is unavailable.

    Two workers with the same boot id and PID namespace can see each other's PIDs, so
    one can tell that the other is gone; the start time defeats PID reuse (a restarted
    container's gateway is PID 1 again)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    start = _start_ticks(os.getpid())
    return f"{boot}|{namespace}|{os.getpid()}|{start}" if start else None


def provably_dead(identity: str | None, mine: str | None) -> bool:
    if not identity or not mine:
        return False
    theirs, ours = identity.split("|"), mine.split("|")
    if len(theirs) != 4 or theirs[:2] != ours[:2]:
        return False  # another host or PID namespace: only the heartbeat can tell
    try:
        pid = int(theirs[2])
    except ValueError:
        return False
    return _start_ticks(pid) != theirs[3]


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
    def __init__(self, store: Store, cache: Cache | None, worker_id: str | None) -> None:
        """worker_id None: a client (the CLI or a test) that publishes but serves nothing.
        cache: the worker's own key cache (memory://, or the layer in front of Redis) that
        revocations are evicted from; None: nothing in this process to evict."""
        self.store = store
        self.cache = cache
        self.worker_id = worker_id
        self.identity = process_identity()
        self.acked = 0
        # Bumped on every eviction; Keys.authenticate does not cache a lookup that raced one.
        self.generation = 0
        self.revoked = RecentRevocations()
        self._fresh_until = 0.0
        self._beat_started = 0.0
        self._last_beat = 0.0
        self._lock = asyncio.Lock()

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
            if self.cache is not None:
                rows = await self.store.statement(_REVOCATIONS_AFTER, {"acked": self.acked})
                if rows:
                    self.revoked.add(h for _, h in rows)
                    await self.cache.delete(*[f"k:{h}" for _, h in rows])
                    self.generation += 1
                    self.acked = int(rows[-1][0])
                    await self._beat()  # acknowledge now: a revoke is waiting for it
            self._fresh_until = self._beat_started + FRESH

    async def _beat(self) -> None:
        started = time.monotonic()
        assert self.worker_id is not None
        await self.store.transact(_heartbeat, self.worker_id, self.acked, self.identity, db_clock(self.store))
        self._beat_started = self._last_beat = started

    async def run(self, ledger: Ledger, max_request_ms: int, sweep_every: float = SWEEP_EVERY) -> None:
        from tollway.telemetry import log

        next_sweep = time.monotonic() + sweep_every  # start() has just swept
        failing = False
        while True:
            try:
                await self.poll()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + sweep_every
                    await sweep(self.store, ledger, max_request_ms, self.identity, self.worker_id)
                failing = False
            except Exception as exc:  # a database outage: retry; fresh() expires meanwhile
                if not failing:
                    log.warning("worker_loop_error", worker_id=self.worker_id, exc_type=type(exc).__name__)
                failing = True
                # Every worker went silent with the database: sweep only once the others
                # have had STALE seconds to heart-beat again, or the first one back would
                # take them all for dead and release the holds of requests in flight.
                next_sweep = max(next_sweep, time.monotonic() + STALE)
            await asyncio.sleep(POLL)

    async def start(self, ledger: Ledger, max_request_ms: int) -> int:
        """Register, then release what dead predecessors left reserved before serving."""
        from tollway.telemetry import log

        await self.register()
        try:
            released = await sweep(self.store, ledger, max_request_ms, self.identity, self.worker_id)
        except Exception as exc:  # never keep the gateway down: the periodic sweep retries
            log.warning("startup_sweep_failed", worker_id=self.worker_id, exc_type=type(exc).__name__)
            return 0
        if released:
            log.info("startup_sweep", worker_id=self.worker_id, released=released)
        return released

    async def unregister(self) -> None:
        with contextlib.suppress(Exception):
            async with self.store.write() as conn:
                await conn.execute(workers.delete().where(workers.c.id == self.worker_id))


async def dead_workers(store: Store, identity: str | None = None, me: str | None = None) -> list[str]:
    """Workers silent for longer than STALE, or provably gone on this host."""
    stale = workers.c.heartbeat_at <= db_clock(store) - int(STALE * 1000)
    async with store.read() as conn:
        rows = (await conn.execute(
            sa.select(workers.c.id, workers.c.process, stale.label("stale")))).all()
    return [wid for wid, process, is_stale in rows
            if wid != me and (is_stale or provably_dead(process, identity))]


async def sweep(store: Store, ledger: Ledger, max_request_ms: int, identity: str | None = None,
                me: str | None = None) -> int:
    """Release the reservations of dead workers, of workers no longer registered, and any
    older than the longest request. Policy: released in full, never charged (Tollway never
    saw the outcome); entries are recorded as `<request>:swept`."""
    dead = await dead_workers(store, identity, me)
    registered = sa.select(workers.c.id)
    if dead:
        registered = registered.where(workers.c.id.not_in(dead))
    too_old = reservations.c.created_at < now_ms() - max_request_ms
    if me is not None:
        # Only the worker serving a request knows whether it still does: by age, each
        # worker releases its own (and those of no worker); another live worker's are left
        # to it, a dead one's go by the second condition.
        too_old = sa.and_(too_old, sa.or_(reservations.c.worker_id.is_(None), reservations.c.worker_id == me))
    async with store.read() as conn:
        ids = (await conn.execute(
            sa.select(reservations.c.request_id).where(sa.or_(
                too_old,
                sa.and_(reservations.c.worker_id.is_not(None), reservations.c.worker_id.not_in(registered)),
            )).order_by(reservations.c.created_at))).scalars().all()
    ids = [rid for rid in ids if rid not in ledger.live]  # never a request this process still serves
    released = await ledger.release_swept(ids) + await ledger.release_stale_in_memory(max_request_ms)
    if dead:
        async with store.write() as conn:
            await conn.execute(workers.delete().where(workers.c.id.in_(dead)))
    return released
