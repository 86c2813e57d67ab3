"""Live workers: revocation acknowledgements for per-worker caches, telling a dead
process from a live one, and the sweep of dangling reservations."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import REDIS_URL, ServerThread, fresh_pg_database, need_redis
from tollway.app import create_app
from tollway.auth import workers as workers_mod
from tollway.auth.keys import Principal
from tollway.auth.workers import STALE, dead_workers, process_identity, provably_dead, sweep
from tollway.config import Config
from tollway.errors import Unauthorized
from tollway.services import Services, build
from tollway.store.db import now_ms
from tollway.store.schema import reservations, workers

HOUR_MS = 3_600_000


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


def test_process_identity_tells_a_dead_process_from_a_live_one() -> None:
    mine = process_identity()
    assert mine is not None and mine.count("|") == 3
    assert not provably_dead(mine, mine)
    gone = dead_process_identity()
    assert provably_dead(gone, mine)
    boot, ns, pid, start = gone.split("|")
    assert not provably_dead(f"{boot}|pid:[1]|{pid}|{start}", mine)  # another namespace: cannot tell
    assert not provably_dead(f"other-boot|{ns}|{pid}|{start}", mine)  # another host: cannot tell
    assert not provably_dead(None, mine) and not provably_dead(mine, None)
    # PID reuse: the same PID with another start time is another process.
    m_boot, m_ns, m_pid, m_start = mine.split("|")
    assert provably_dead(f"{m_boot}|{m_ns}|{m_pid}|{int(m_start) - 1}", mine)


def test_an_unreaped_zombie_counts_as_dead() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while workers_mod._start_ticks(proc.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.02)  # exited but not yet reaped: a zombie
    assert workers_mod._start_ticks(proc.pid) is None
    proc.wait()


# --- the sweep --------------------------------------------------------------------------------------


async def test_sweep_releases_exactly_the_dangling_reservations(memory_stack: Config) -> None:
    me = await worker(memory_stack)
    try:
        tid = (await me.tenants.create("Ada"))["tenant_id"]
        await me.ledger.credit(tid, 10_000_000, "fund")
        killed = dead_process_identity()  # a process start: under load, longer than STALE
        now = now_ms()
        async with me.store.write() as conn:
            await conn.execute(workers.insert(), [
                {"id": "wk_silent", "acked_seq": 0, "heartbeat_at": now - int(STALE * 1000) - 1_000, "process": None},
                {"id": "wk_killed", "acked_seq": 0, "heartbeat_at": now, "process": killed},
                {"id": "wk_remote", "acked_seq": 0, "heartbeat_at": now, "process": "other-host|pid:[9]|1|1"},
            ])
        holders = {"r_silent": "wk_silent", "r_killed": "wk_killed", "r_remote": "wk_remote",
                   "r_mine": me.workers.worker_id, "r_orphan": "wk_unregistered", "r_cli": None, "r_old": None}
        for rid, holder in holders.items():
            await me.ledger.reserve(tid, rid, 100_000, worker_id=holder)
        async with me.store.write() as conn:  # one reservation older than the longest request
            await conn.execute(reservations.update().where(reservations.c.request_id == "r_old")
                               .values(created_at=now - HOUR_MS - 1))
        assert sorted(await dead_workers(me.store, me.workers.identity, me.workers.worker_id)) == [
            "wk_killed", "wk_silent"]
        released = await sweep(me.store, me.ledger, HOUR_MS, me.workers.identity, me.workers.worker_id)
        assert released == 4
        assert sorted(await me.ledger.open_reservations()) == ["r_cli", "r_mine", "r_remote"]
        async with me.store.read() as conn:
            left = sorted((await conn.execute(sa.select(workers.c.id))).scalars().all())
        assert left == sorted(["wk_remote", str(me.workers.worker_id)])
        assert await me.ledger.balance(tid) == 10_000_000 - 3 * 100_000
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


def test_startup_releases_a_killed_predecessors_reservations_before_serving(
        make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread]) -> None:
    cfg = make_config()

    async def predecessor() -> str:
        s = build(cfg)
        await s.store.migrate()
        tid = (await s.tenants.create("Ada"))["tenant_id"]
        await s.ledger.credit(tid, 1_000_000, "fund")
        async with s.store.write() as conn:
            await conn.execute(workers.insert().values(id="wk_prev", acked_seq=0, heartbeat_at=now_ms(),
                                                       process=dead_process_identity()))
        for i in range(5):
            await s.ledger.reserve(tid, f"r{i}", 50_000, worker_id="wk_prev")
        await s.close()
        return str(tid)

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
