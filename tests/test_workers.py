"""Live workers: revocation acknowledgements for per-worker caches, telling a dead
process from a live one, and the sweep of dangling reservations."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import REDIS_URL, ServerThread, fresh_pg_database, need_redis
from tollway.app import create_app
from tollway.auth import process_identity as identity_mod
from tollway.auth import workers as workers_mod
from tollway.auth.keys import Principal
from tollway.auth.workers import HEARTBEAT_EVERY, STALE, dead_workers, process_identity, provably_dead, sweep
from tollway.config import Config
from tollway.errors import Unauthorized
from tollway.services import Services, build
from tollway.store.db import now_ms
from tollway.store.schema import reservations, workers

HOUR_MS = 3_600_000
RELEASE_MS = int(workers_mod.RELEASE_AFTER * 1000)


@pytest.fixture(params=["sqlite", "postgresql", "postgresql+redis"])
async def memory_stack(request: pytest.FixtureRequest, make_config: Callable[..., Config],
                       embedded: dict[str, Any]) -> AsyncIterator[Config]:
    """Per-worker key caches over either database: memory://, and the per-worker layer in
    front of Redis; the stacks the revocation bus serves."""
    if request.param == "sqlite":
        cfg = make_config(**embedded)
        s = build(cfg)
        await s.store.migrate()
        await s.close()
        yield cfg
        return
    if request.param == "postgresql+redis":
        with pg_redis_config(make_config) as cfg:
            yield cfg
        return
    with fresh_pg_database() as url:
        yield make_config(database={"url": url}, cache={"url": "memory://"})


@contextmanager
def pg_redis_config(make_config: Callable[..., Config], **cache: Any) -> Iterator[Config]:
    """The scaled-out stack on a throw-away PostgreSQL database (skipped without Redis);
    `cache` adds [cache] settings."""
    need_redis()
    with fresh_pg_database() as url:
        yield make_config(database={"url": url}, cache={"url": REDIS_URL, **cache})


async def worker(cfg: Config) -> Services:
    s = build(cfg, worker_id="wk_" + secrets.token_hex(4))
    await s.workers.register()
    return s


async def stop(w: Services, *others: Services) -> None:
    await w.workers.unregister()
    await w.close()
    for other in others:
        await other.close()


async def tenant_key(svc: Services) -> dict[str, Any]:
    tid = (await svc.tenants.create("Ada"))["tenant_id"]
    return await svc.keys.create(tid)


def record_calls(obj: Any, name: str) -> list[tuple[Any, ...]]:
    """Wrap the coroutine method `obj.name` so that every call's arguments are recorded
    (in the returned list) before it runs as usual."""
    calls: list[tuple[Any, ...]] = []
    real = getattr(obj, name)

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return await real(*args, **kwargs)

    setattr(obj, name, recorded)
    return calls


def dead_process_identity() -> str:
    """The identity a worker in a process that has since died would have registered."""
    code = "from tollway.auth.workers import process_identity; print(process_identity())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


# --- revocation acknowledgements ---------------------------------------------------------------


async def test_revoke_waits_until_every_live_worker_has_evicted(memory_stack: Config) -> None:
    w = await worker(memory_stack)
    admin = build(memory_stack)  # the CLI's shape: publishes, serves nothing
    try:
        created = await tenant_key(admin)
        await w.keys.authenticate(created["key"])  # now in w's memory cache
        revoking = asyncio.create_task(admin.keys.revoke(created["key_id"]))
        await asyncio.sleep(0.6)
        assert not revoking.done()  # w is live (fresh heartbeat) and has not acknowledged
        assert (await w.keys.authenticate(created["key"])).key_id == created["key_id"]  # still cached
        await w.workers.poll()  # evict, then acknowledge
        await asyncio.wait_for(revoking, 5)
        with pytest.raises(Unauthorized):
            await w.keys.authenticate(created["key"])
    finally:
        await stop(w, admin)


async def test_with_redis_a_worker_answers_known_keys_from_memory_while_its_heartbeat_is_fresh(
        make_config: Callable[..., Config]) -> None:
    with pg_redis_config(make_config) as cfg:
        w = await worker(cfg)
        try:
            created = await tenant_key(w)
            redis_reads = record_calls(w.cache, "get_guarded")
            w.workers._fresh_until = time.monotonic() + 60  # no heartbeat loop runs here; pin it
            for _ in range(5):
                assert (await w.keys.authenticate(created["key"])).key_id == created["key_id"]
            assert len(redis_reads) == 1  # the first request; the other four came from memory
            w.workers._fresh_until = 0.0  # as if its heartbeats had stopped committing
            await w.keys.authenticate(created["key"])
            assert len(redis_reads) == 2  # not trusted: Redis (and its tombstones) asked again
        finally:
            await stop(w)


async def test_revoking_a_tenants_keys_waits_for_the_workers_once(memory_stack: Config) -> None:
    w = await worker(memory_stack)
    admin = build(memory_stack)
    try:
        tid = (await admin.tenants.create("Ada"))["tenant_id"]
        keys = [await admin.keys.create(tid) for _ in range(3)]
        for k in keys:
            await w.keys.authenticate(k["key"])
        waits = record_calls(admin.workers, "wait_for")
        await w.workers.poll()  # a fresh heartbeat: w is live for the revoke to wait for
        revoking = asyncio.create_task(admin.keys.revoke_tenant(tid))
        await asyncio.sleep(0.3)
        assert not revoking.done()
        await w.workers.poll()  # one poll evicts all three and acknowledges the last
        assert await asyncio.wait_for(revoking, 5) == 3
        assert len(waits) == 1
        for k in keys:
            with pytest.raises(Unauthorized):
                await w.keys.authenticate(k["key"])
    finally:
        await stop(w, admin)


async def test_with_redis_a_workers_copy_lives_no_longer_than_the_shared_entry(
        make_config: Callable[..., Config]) -> None:
    """key_ttl_seconds bounds a verification in all: a worker that copies a Redis entry
    with 0.5 s left keeps it 0.5 s, not key_ttl_seconds more."""
    with pg_redis_config(make_config, key_ttl_seconds=1) as cfg:
        first, second = await worker(cfg), await worker(cfg)
        try:
            created = await tenant_key(first)
            for w in (first, second):
                w.workers._fresh_until = time.monotonic() + 60  # no heartbeat loop runs here; pin it
            filled = time.monotonic()
            await first.keys.authenticate(created["key"])  # the database read; Redis holds it for 1 s
            await asyncio.sleep(0.5)
            await second.keys.authenticate(created["key"])  # copied from Redis, ~0.5 s left
            assert await second.keys.local.get(f"k:{second.keys.secret.hash(created['key'])}") is not None
            await asyncio.sleep(max(0.0, filled + 1.1 - time.monotonic()))
            assert await second.keys.local.get(f"k:{second.keys.secret.hash(created['key'])}") is None
        finally:
            await stop(first, second)


async def test_a_silent_worker_is_not_waited_for_and_stops_trusting_its_cache(memory_stack: Config) -> None:
    w = await worker(memory_stack)
    admin = build(memory_stack)
    try:
        created = await tenant_key(admin)
        await w.keys.authenticate(created["key"])
        await asyncio.sleep(STALE + 0.2)  # w's loop is stuck: no heartbeat
        assert not w.workers.fresh()
        started = time.monotonic()
        await admin.keys.revoke(created["key_id"])
        assert time.monotonic() - started < 1
        with pytest.raises(Unauthorized):  # not trusted: asked the database
            await w.keys.authenticate(created["key"])
    finally:
        await w.close()
        await admin.close()


async def test_revoke_does_not_wait_for_a_worker_killed_moments_ago(memory_stack: Config) -> None:
    admin = build(memory_stack)
    try:
        created = await tenant_key(admin)
        async with admin.store.write() as conn:  # heartbeat still fresh, but the process is gone
            await conn.execute(workers.insert().values(id="wk_killed", acked_seq=0, heartbeat_at=now_ms(),
                                                       process=dead_process_identity()))
        started = time.monotonic()
        await admin.keys.revoke(created["key_id"])
        assert time.monotonic() - started < 1
    finally:
        await admin.close()


async def test_revocations_commit_in_sequence_order(memory_stack: Config) -> None:
    """Workers read `seq > acked`: a revocation with a lower seq must never commit after a
    higher one, or a worker could acknowledge past it without evicting its key."""
    a, b = build(memory_stack), build(memory_stack)
    try:
        async with a.store.write() as first:
            seq1 = await a.workers.publish(first, "hash-1")

            async def second() -> int:
                async with b.store.write() as conn:
                    return await b.workers.publish(conn, "hash-2")

            later = asyncio.create_task(second())
            await asyncio.sleep(0.5)
            assert not later.done()  # waits for the first to commit (SQLite: the write lock)
        seq2 = await asyncio.wait_for(later, 10)
        assert seq2 > seq1
    finally:
        await a.close()
        await b.close()


async def test_a_lookup_racing_a_revocation_is_not_cached(memory_stack: Config) -> None:
    """A lookup that read the key before the revocation committed and finishes after the
    worker evicted must not put the stale answer back into the cache."""
    w = await worker(memory_stack)
    admin = build(memory_stack)
    try:
        created = await tenant_key(admin)
        release = asyncio.Event()
        real_lookup = w.keys._lookup

        async def slow_lookup(key_hash: str) -> Principal | None:
            found = await real_lookup(key_hash)  # read before the revocation
            await release.wait()
            return found

        w.keys._lookup = slow_lookup  # type: ignore[method-assign]
        in_flight = asyncio.create_task(w.keys.authenticate(created["key"]))
        await asyncio.sleep(0.2)
        revoking = asyncio.create_task(admin.keys.revoke(created["key_id"]))
        await asyncio.sleep(0.2)
        await w.workers.poll()
        await asyncio.wait_for(revoking, 5)
        release.set()
        if w.cache.shared:  # Redis's tombstone refuses the stale answer, and the request with it
            with pytest.raises(Unauthorized):
                await in_flight
        else:
            assert (await in_flight).key_id == created["key_id"]  # it started before the revoke: fine
        w.keys._lookup = real_lookup  # type: ignore[method-assign]
        with pytest.raises(Unauthorized):
            await w.keys.authenticate(created["key"])
    finally:
        await stop(w, admin)


async def test_a_worker_taken_for_dead_registers_again(memory_stack: Config) -> None:
    w = await worker(memory_stack)
    try:
        async with w.store.write() as conn:
            await conn.execute(workers.delete())  # what a sweep does to a worker silent > STALE
        await asyncio.sleep(workers_mod.HEARTBEAT_EVERY)
        await w.workers.poll()
        async with w.store.read() as conn:
            ids = (await conn.execute(sa.select(workers.c.id))).scalars().all()
        assert ids == [w.workers.worker_id]
        assert w.workers.fresh()
    finally:
        await stop(w)


# --- who is dead ------------------------------------------------------------------------------------


def identity_of(pid: int) -> str:
    """The identity the process `pid` (on this host, in our PID namespace) registered."""
    fields = str(process_identity()).split("|")
    at = fields.index(str(os.getpid()))
    fields[at], fields[at + 1] = str(pid), str(identity_mod._start_ticks(pid))
    return "|".join(fields)


@contextmanager
def live_child() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_process_identity_tells_a_dead_process_from_a_live_one() -> None:
    mine = process_identity()
    assert mine is not None and mine.count("|") == 6
    assert not provably_dead(mine, mine)
    gone = dead_process_identity()
    assert provably_dead(gone, mine)
    version, machine, boot, ns, pid, start, nonce = gone.split("|")
    assert not provably_dead("|".join([version, machine, boot, "pid:[1]", pid, start, nonce]), mine)  # namespace
    assert not provably_dead("|".join([version, machine, "other-boot", ns, pid, start, nonce]), mine)  # host
    assert not provably_dead(f"{boot}|{ns}|{pid}|{start}", mine)  # an older version's: cannot tell
    assert not provably_dead(None, mine) and not provably_dead(mine, None)
    # PID reuse: the same PID with another start time is another process.
    fields = mine.split("|")
    fields[5] = str(int(fields[5]) - 1)
    assert provably_dead("|".join(fields), mine)
    with live_child() as child:
        assert not provably_dead(identity_of(child), mine)


def test_a_host_cloned_with_the_same_boot_id_cannot_judge_another_hosts_workers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosts cloned from one running image share the boot id and the initial PID
    namespace's inode: a PID missing here says nothing about a worker registered there."""
    there = dead_process_identity()  # a PID that does not run here
    real = identity_mod._read_id
    monkeypatch.setattr(identity_mod, "_read_id",
                        lambda path: "another-machine" if "machine-id" in path else real(path))
    here = process_identity()
    assert here is not None and here.split("|")[2:4] == there.split("|")[2:4]  # same boot id and namespace
    assert not provably_dead(there, here)


def test_a_process_proc_will_not_show_is_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc mounted hidepid (or another user's process): its stat file is missing or
    unreadable, but the process runs. Only a PID nothing runs under is dead."""
    mine = process_identity()
    with live_child() as child:
        theirs = identity_of(child)
        real_read = Path.read_text
        for error in (FileNotFoundError, PermissionError):  # hidepid=2, hidepid=1

            def hidden(path: Path, *args: Any, error: type[OSError] = error, **kwargs: Any) -> str:
                if str(path).startswith(f"/proc/{child}/"):
                    raise error(f"hidden: {path}")
                return real_read(path, *args, **kwargs)

            monkeypatch.setattr(Path, "read_text", hidden)
            assert not provably_dead(theirs, mine), error
        monkeypatch.undo()
        assert not provably_dead(theirs, mine)


def test_a_process_we_may_not_signal_is_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two installs under different users: kill(pid, 0) answers EPERM for the other's
    worker, whose /proc entry may be hidden too."""
    mine = process_identity()
    with live_child() as child:
        theirs = identity_of(child)
    # The child is gone now; pretend its PID runs as another user, behind hidepid.
    real_kill, real_read = os.kill, Path.read_text

    def kill(pid: int, sig: int) -> None:
        if pid == child:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real_kill(pid, sig)

    def hidden(path: Path, *args: Any, **kwargs: Any) -> str:
        if str(path).startswith(f"/proc/{child}/"):
            raise FileNotFoundError(str(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(Path, "read_text", hidden)
    assert not provably_dead(theirs, mine)
    monkeypatch.undo()
    assert provably_dead(theirs, mine)  # and once the PID answers ESRCH, dead it is


def test_an_unreaped_zombie_counts_as_dead() -> None:
    mine = process_identity()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    deadline = time.monotonic() + 10
    while identity_mod._start_ticks(proc.pid) in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.01)  # until /proc shows it running
    theirs = identity_of(proc.pid)
    assert not provably_dead(theirs, mine)
    while identity_mod._start_ticks(proc.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.02)  # exited but not yet reaped: a zombie
    assert provably_dead(theirs, mine)
    proc.wait()


# --- the sweep --------------------------------------------------------------------------------------


async def test_sweep_releases_exactly_the_dangling_reservations(memory_stack: Config) -> None:
    me = await worker(memory_stack)
    try:
        tid = (await me.tenants.create("Ada"))["tenant_id"]
        await me.ledger.credit(tid, 10_000_000, "fund")
        now = now_ms()
        async with me.store.write() as conn:
            await conn.execute(workers.insert(), [
                {"id": "wk_silent", "acked_seq": 0, "heartbeat_at": now - RELEASE_MS - 1_000, "process": None},
                {"id": "wk_stalled", "acked_seq": 0, "heartbeat_at": now - int(STALE * 1000) - 2_000,
                 "process": None},
                {"id": "wk_killed", "acked_seq": 0, "heartbeat_at": now, "process": dead_process_identity()},
                {"id": "wk_remote", "acked_seq": 0, "heartbeat_at": now, "process": "other-host|pid:[9]|1|1"},
            ])
        holders = {"r_silent": "wk_silent", "r_stalled": "wk_stalled", "r_killed": "wk_killed",
                   "r_remote": "wk_remote", "r_mine": me.workers.worker_id, "r_orphan": "wk_unregistered",
                   "r_back": "wk_back", "r_cli": None, "r_old": None}
        for rid, holder in holders.items():
            await me.ledger.reserve(tid, rid, 100_000, worker_id=holder)
        async with me.store.write() as conn:
            await conn.execute(reservations.update().where(reservations.c.request_id == "r_old")
                               .values(created_at=now - HOUR_MS - 1))  # older than the longest request
            await conn.execute(reservations.update().where(reservations.c.request_id == "r_orphan")
                               .values(created_at=now - RELEASE_MS - 1))  # its worker long gone
        assert sorted(await dead_workers(me.store, me.workers.identity, me.workers.worker_id)) == [
            "wk_killed", "wk_silent"]
        released = await sweep(me.store, me.ledger, HOUR_MS, me.workers.identity, me.workers.worker_id)
        assert released == 4
        # Kept: a worker silent only a few seconds (stalled), one on another host, this
        # one, the CLI's, and a worker's made while it registers again (wk_back).
        assert sorted(await me.ledger.open_reservations()) == ["r_back", "r_cli", "r_mine", "r_remote", "r_stalled"]
        async with me.store.read() as conn:
            left = sorted((await conn.execute(sa.select(workers.c.id))).scalars().all())
        assert left == sorted(["wk_remote", "wk_stalled", str(me.workers.worker_id)])
        assert await me.ledger.balance(tid) == 10_000_000 - 5 * 100_000
        entries = {e["id"] for e in await me.ledger.entries(tid)}
        assert {"r_silent:swept", "r_killed:swept", "r_orphan:swept", "r_old:swept"} <= entries
        assert await me.ledger.verify(HOUR_MS) == []
        assert await sweep(me.store, me.ledger, HOUR_MS, me.workers.identity, me.workers.worker_id) == 0
    finally:
        await me.workers.unregister()
        await me.close()


async def test_the_age_backstop_never_releases_a_request_still_served(memory_stack: Config) -> None:
    me = await worker(memory_stack)
    try:
        tid = (await me.tenants.create("Ada"))["tenant_id"]
        await me.ledger.credit(tid, 10_000_000, "fund")
        async with me.store.write() as conn:
            await conn.execute(workers.insert(), [
                {"id": "wk_alive", "acked_seq": 0, "heartbeat_at": now_ms(), "process": "other-host|pid:[9]|1|1"}])
        holders = {"r_served": me.workers.worker_id, "r_lost": me.workers.worker_id, "r_theirs": "wk_alive"}
        for rid, holder in holders.items():
            await me.ledger.reserve(tid, rid, 100_000, worker_id=holder)
        async with me.store.write() as conn:  # all older than the longest request
            await conn.execute(reservations.update().values(created_at=now_ms() - HOUR_MS - 1))
        me.ledger.live.add("r_served")
        # Mine and served: kept; mine and no longer served: released; another live worker's:
        # only it can tell whether it still serves the request.
        assert await sweep(me.store, me.ledger, HOUR_MS, me.workers.identity, me.workers.worker_id) == 1
        assert sorted(await me.ledger.open_reservations()) == ["r_served", "r_theirs"]
        assert await me.ledger.settle("r_served", 70_000) == 70_000
        me.ledger.live.discard("r_served")
        assert await me.ledger.settle("r_lost", 50_000) == 50_000  # late, still charged once
        assert await me.ledger.settle("r_lost", 50_000) is None
        assert await me.ledger.balance(tid) == 10_000_000 - 120_000 - 100_000
    finally:
        await me.workers.unregister()
        await me.close()


async def test_a_worker_silent_longer_than_a_revoke_waits_keeps_its_reservations(memory_stack: Config) -> None:
    """Hole: 2.5 s of silence released a live worker's holds (a busy pool, a long sweep, a
    flood of bad keys); the money was reserved again and its settle charged what was left.
    A revoke stops waiting for it then; its holds go only after far longer silence, and
    its late settle still charges, once."""
    me, admin = await worker(memory_stack), build(memory_stack)
    try:
        created = await tenant_key(admin)
        tid = created["tenant_id"]
        await me.ledger.credit(tid, 1_000_000, "fund")
        async with me.store.write() as conn:
            await conn.execute(workers.insert().values(
                id="wk_stalled", acked_seq=0, heartbeat_at=now_ms() - int(STALE * 1000) - 2_000, process=None))
        await me.ledger.reserve(tid, "r_in_flight", 600_000, worker_id="wk_stalled")
        polling = asyncio.create_task(poll_forever(me))  # `me` acknowledges as a live worker does
        started = time.monotonic()
        await admin.keys.revoke(created["key_id"])  # does not wait for the silent worker
        assert time.monotonic() - started < 2
        polling.cancel()
        assert await sweep(me.store, me.ledger, HOUR_MS, me.workers.identity, me.workers.worker_id) == 0
        assert await me.ledger.open_reservations() == ["r_in_flight"]
        assert await me.ledger.balance(tid) == 400_000  # nobody can spend the held money twice
        # Silent for longer than the release threshold: presumed dead, released in full.
        async with me.store.write() as conn:
            await conn.execute(workers.update().where(workers.c.id == "wk_stalled")
                               .values(heartbeat_at=now_ms() - RELEASE_MS - 1_000))
        assert await sweep(me.store, me.ledger, HOUR_MS, me.workers.identity, me.workers.worker_id) == 1
        assert await me.ledger.balance(tid) == 1_000_000
        # It was alive after all: its settle charges, once.
        assert await me.ledger.settle("r_in_flight", 550_000) == 550_000
        assert await me.ledger.settle("r_in_flight", 550_000) is None
        assert await me.ledger.balance(tid) == 450_000
        assert await me.ledger.verify(HOUR_MS) == []
    finally:
        await stop(me, admin)


async def killed_worker_holding(svc: Services, worker_id: str, n: int, amount: int,
                                credit: int = 10_000_000) -> str:
    """A funded tenant, and a worker whose process has died holding n reservations of it."""
    tid = str((await svc.tenants.create("Ada"))["tenant_id"])
    await svc.ledger.credit(tid, credit, "fund")
    async with svc.store.write() as conn:
        await conn.execute(workers.insert().values(id=worker_id, acked_seq=0, heartbeat_at=now_ms(),
                                                   process=dead_process_identity()))
    for i in range(n):
        await svc.ledger.reserve(tid, f"r{i}", amount, worker_id=worker_id)
    return tid


async def poll_forever(w: Services) -> None:
    while True:
        await w.workers.poll()
        await asyncio.sleep(workers_mod.POLL)


async def test_the_sweep_releases_in_bounded_batches(memory_stack: Config) -> None:
    me = await worker(memory_stack)
    try:
        await killed_worker_holding(me, "wk_killed", 25, 1_000)
        passes = [await sweep(me.store, me.ledger, HOUR_MS, me.workers.identity, me.workers.worker_id, batch=10)
                  for _ in range(4)]
        assert passes == [10, 10, 5, 0]
        assert await me.ledger.open_reservations() == [] and await me.ledger.verify(HOUR_MS) == []
        assert await dead_workers(me.store, me.workers.identity, me.workers.worker_id) == []  # forgotten once empty
    finally:
        await stop(me)


async def test_heartbeats_commit_while_the_pool_is_exhausted(make_config: Callable[..., Config]) -> None:
    """Hole: the heartbeat waited for a pooled connection (up to pool_timeout, 10 s) while
    2.5 s of silence meant dead. It has a connection and a task of its own now."""
    need_redis()
    with fresh_pg_database() as url:
        cfg = make_config(database={"url": url, "pool_size": 2}, cache={"url": REDIS_URL})
        w = await worker(cfg)
        held: list[Any] = []
        loop = asyncio.create_task(w.workers.run(w.ledger, HOUR_MS))
        try:
            for _ in range(2):  # every pooled connection busy, as under a burst of requests
                held.append(await w.store.engine.connect())
            await asyncio.sleep(STALE + 1.0)
            ages = await asyncio.wait_for(asyncio.to_thread(heartbeat_ages, cfg), 10)
            assert ages[w.workers.worker_id] < STALE * 1000, ages
            # Its revocation polls go on too: it trusts its key cache, and acknowledges a revoke at once.
            assert w.workers.fresh()
            admin = build(cfg)
            try:
                created = await tenant_key(admin)
                started = time.monotonic()
                await admin.keys.revoke(created["key_id"])
                assert time.monotonic() - started < 2
            finally:
                await admin.close()
        finally:
            for conn in held:
                await conn.close()
            loop.cancel()
            with contextlib.suppress(BaseException):
                await loop
            await stop(w)


async def test_a_long_sweep_does_not_silence_the_sweeping_worker(make_config: Callable[..., Config]) -> None:
    """Hole: a worker sweeping 3,000 reservations of a dead peer went 2.6 s without a
    heartbeat (the sweep ran in the heartbeat's loop, all at once). Now the sweep runs in a
    task of its own, in batches."""
    with pg_redis_config(make_config) as cfg:
        w = await worker(cfg)
        try:
            tid = str((await w.tenants.create("Ada"))["tenant_id"])
            await w.ledger.credit(tid, 100_000_000, "fund")
            async with w.store.write() as conn:
                await conn.execute(workers.insert().values(id="wk_killed", acked_seq=0, heartbeat_at=now_ms(),
                                                           process=dead_process_identity()))
            for start in range(0, 1_500, 100):
                await asyncio.gather(*(w.ledger.reserve(tid, f"r{i}", 1_000, worker_id="wk_killed")
                                       for i in range(start, start + 100)))
            loop = asyncio.create_task(w.workers.run(w.ledger, HOUR_MS, sweep_every=0.1))
            oldest, lag, started = 0.0, 0.0, time.monotonic()
            await asyncio.sleep(HEARTBEAT_EVERY)  # its first heartbeat since the reservations were made
            try:
                while await w.ledger.open_reservations(tenant_id=tid):
                    assert time.monotonic() - started < 120
                    oldest = max(oldest, time.monotonic() - w.workers._last_beat)
                    before = time.monotonic()
                    await asyncio.sleep(0.1)
                    lag = max(lag, time.monotonic() - before - 0.1)  # the event loop's own delay
            finally:
                loop.cancel()
                with contextlib.suppress(BaseException):
                    await loop
            took = time.monotonic() - started
            print(f"swept 1,500 reservations in {took:.1f}s; longest since a committed heartbeat {oldest:.2f}s; "
                  f"event loop lag up to {lag:.2f}s")
            assert took > STALE  # long enough to have silenced a worker that swept in its heartbeat's loop
            # Between heartbeats: their interval, one commit, and what the machine's load delays the loop.
            assert oldest < HEARTBEAT_EVERY + 1.0 + lag
            assert await w.ledger.verify(HOUR_MS) == []
        finally:
            await stop(w)


def heartbeat_ages(cfg: Config) -> dict[str, int]:
    """Each worker's heartbeat age (ms, by the database's clock), read from outside the worker."""
    async def read() -> dict[str, int]:
        s = build(cfg)
        try:
            async with s.store.read() as conn:
                age = workers_mod.db_clock(s.store) - workers.c.heartbeat_at
                rows = await conn.execute(sa.select(workers.c.id, age))
                return {wid: int(age) for wid, age in rows}
        finally:
            await s.close()

    return asyncio.run(read())


@pytest.mark.parametrize("skewed", ["sweeper_ahead", "reserver_behind"])
async def test_reservation_ages_are_written_and_compared_on_the_databases_clock(
        make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, skewed: str) -> None:
    """Hole: reservations were stamped and aged by each host's clock, though the docs said
    the database's; a host 12 minutes ahead (or one that reserved 12 minutes behind)
    released every hold in flight. (SQLite: one host, one clock.)"""
    longest = 660_000  # request_timeout_seconds + 60 s, the default
    skew = 12 * 60.0
    real = time.time
    with pg_redis_config(make_config) as cfg:
        me = await worker(cfg)
        try:
            tid = (await me.tenants.create("Ada"))["tenant_id"]
            await me.ledger.credit(tid, 1_000_000, "fund")
            if skewed == "reserver_behind":
                monkeypatch.setattr(time, "time", lambda: real() - skew)
            await me.ledger.reserve(tid, "r_in_flight", 100_000, worker_id=me.workers.worker_id)
            await me.ledger.reserve(tid, "r_limited", 100_000, worker_id=me.workers.worker_id,
                                    key_id="k1", key_limit_micros=10_000_000, key_period="2026-12")
            monkeypatch.setattr(time, "time", (lambda: real() + skew) if skewed == "sweeper_ahead" else real)
            assert await sweep(me.store, me.ledger, longest, me.workers.identity, me.workers.worker_id) == 0
            assert sorted(await me.ledger.open_reservations()) == ["r_in_flight", "r_limited"]
            assert await me.ledger.open_reservations(older_than_ms=longest) == []
            assert await me.ledger.verify(longest) == []
        finally:
            monkeypatch.setattr(time, "time", real)
            await stop(me)


def test_startup_releases_a_killed_predecessors_reservations_before_serving(
        make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread]) -> None:
    cfg = make_config()

    async def predecessor() -> str:
        s = build(cfg)
        await s.store.migrate()
        tid = await killed_worker_holding(s, "wk_prev", 5, 50_000, credit=1_000_000)
        await s.close()
        return tid

    tid = asyncio.run(predecessor())
    server = serve_app(create_app(cfg, provider_keys={}))
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200

    async def check() -> tuple[list[str], int, list[str]]:
        s = build(cfg)
        try:
            return await s.ledger.open_reservations(), await s.ledger.balance(tid), await s.ledger.verify(HOUR_MS)
        finally:
            await s.close()

    assert asyncio.run(check()) == ([], 1_000_000, [])
