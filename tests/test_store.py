"""Contract suites: the same tests for every Cache (memory, Redis) and every Store
(SQLite, PostgreSQL), plus how each backend fails and recovers."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from tests.conftest import (
    PG_ADMIN_URL,
    REDIS_URL,
    _reachable,
    free_port,
    fresh_pg_database,
    need_postgres,
    need_redis,
)
from tollway.errors import ServiceUnavailable, render_json
from tollway.store.cache import Cache, MemoryCache, RedisCache, make_cache
from tollway.store.db import IDLE_PING_AFTER, Store, is_unavailable, retry_while_unavailable
from tollway.store.prepared import Prepared
from tollway.store.schema import metadata, tenants, usage_events, wallets

# --- Cache contract ---------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    if request.param == "memory":
        c: Cache = MemoryCache()
    else:
        need_redis()
        # A prefix of its own: other test runs may share this Redis database.
        c = RedisCache(REDIS_URL, prefix=f"t{time.monotonic_ns()}:")
    yield c
    await c.close()


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A Redis of the test's own that requires AUTH: (url, password)."""
    need_redis()  # the binary comes with the server the suite needs anyway
    exe = shutil.which("redis-server")
    assert exe is not None, "redis-server is not on PATH"
    port, password = free_port(), "pw-" + os.urandom(8).hex()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--requirepass", password, "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _reachable("127.0.0.1", port):
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", password
    finally:
        proc.terminate()
        proc.wait(10)


async def test_redis_password_comes_from_the_environment(redis_with_password: tuple[str, str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from tollway.config import load
    from tollway.services import build

    url, password = redis_with_password
    monkeypatch.setenv("TEST_REDIS_PASSWORD", password)
    cfg_path = tmp_path / "tollway.toml"
    cfg_path.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "t.db"}"\n'
                        f'[cache]\nurl = "{url}"\npassword_env = "TEST_REDIS_PASSWORD"\n', encoding="utf-8")
    svc = build(load(cfg_path))
    try:
        await svc.cache.set("k", "v", 30)
        assert await svc.cache.get("k") == "v"
    finally:
        await svc.close()
    wrong = make_cache(url, password="not-it")
    try:
        with pytest.raises(ServiceUnavailable) as info:
            await wrong.get("k")  # refused: a clean 503
        assert "not-it" not in repr(info.value) and password not in repr(info.value)
    finally:
        await wrong.close()


async def test_postgres_password_is_handed_to_the_driver() -> None:
    with fresh_pg_database(migrated=False) as url:
        store = Store(url, password="pw-from-env")
        try:
            async with store.read() as conn:
                assert (await conn.execute(sa.text("SELECT 1"))).scalar() == 1  # trust auth here ignores it
                raw = await conn.get_raw_connection()
                assert raw.driver_connection._params.password == "pw-from-env"  # type: ignore[union-attr]
        finally:
            await store.close()


async def test_cache_get_set_delete(cache: Cache) -> None:
    assert await cache.get("a") is None
    await cache.set("a", "1", 30)
    await cache.set("b", "2|x", 30)
    assert await cache.get("a") == "1"
    assert [await cache.get(k) for k in ("a", "missing", "b")] == ["1", None, "2|x"]
    await cache.set("a", "3", 30)  # overwrite
    assert await cache.get("a") == "3"
    await cache.delete("a", "b", "missing")
    await cache.delete()  # nothing to delete is not an error
    assert [await cache.get(k) for k in ("a", "b")] == [None, None]


async def test_cache_entries_expire(cache: Cache) -> None:
    await cache.set("short", "v", 0.05)
    await cache.set("long", "v", 30)
    await asyncio.sleep(0.15)
    assert [await cache.get(k) for k in ("short", "long")] == [None, "v"]


async def test_cache_get_guarded_reads_value_guard_and_time_left(cache: Cache) -> None:
    assert await cache.get_guarded("k", "g") == (None, False, 0.0)
    await cache.set("k", "v", 30)
    value, guarded, left = await cache.get_guarded("k", "g")
    assert (value, guarded) == ("v", False) and 29 < left <= 30
    await cache.set("g", "1", 30)
    await cache.delete("k")
    assert await cache.get_guarded("k", "g") == (None, True, 0.0)


async def test_cache_set_unless_guard(cache: Cache) -> None:
    assert await cache.set_unless("k", "v1", 30, guard="g") is True
    assert await cache.get("k") == "v1"
    await cache.set("g", "1", 0.1)
    assert await cache.set_unless("k", "v2", 30, guard="g") is False
    assert await cache.get("k") == "v1"  # untouched, not overwritten
    await cache.delete("k")
    assert await cache.set_unless("k", "v3", 30, guard="g") is False
    assert await cache.get("k") is None
    await asyncio.sleep(0.2)  # guard expired
    assert await cache.set_unless("k", "v4", 0.05, guard="g") is True
    await asyncio.sleep(0.15)
    assert await cache.get("k") is None  # the ttl applies


async def test_cache_set_unless_never_writes_after_the_guard(cache: Cache) -> None:
    """Racing writers against a guard written midway: once the guard is visible, no write
    may land (the revocation tombstone contract)."""
    stop = asyncio.Event()
    guard_written = asyncio.Event()
    writes_after_guard = 0

    async def writer(n: int) -> None:
        nonlocal writes_after_guard
        while not stop.is_set():
            guard_seen_before = guard_written.is_set()
            if await cache.set_unless(f"w{n}", "v", 30, guard="tomb") and guard_seen_before:
                writes_after_guard += 1
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(writer(n)) for n in range(8)]
    await asyncio.sleep(0.05)
    await cache.set("tomb", "1", 30)
    guard_written.set()
    await cache.delete(*[f"w{n}" for n in range(8)])
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*tasks)
    assert writes_after_guard == 0
    assert [await cache.get(f"w{n}") for n in range(8)] == [None] * 8


def test_make_cache_picks_the_backend() -> None:
    assert isinstance(make_cache("memory://"), MemoryCache)
    assert make_cache("memory://").shared is False
    assert make_cache("redis://127.0.0.1:6379/9").shared is True  # no I/O until first use


async def test_memory_cache_is_bounded() -> None:
    c = MemoryCache(max_entries=3)
    for i in range(5):
        await c.set(str(i), "v", 30)
    assert len(c) == 3
    assert [await c.get(str(i)) for i in range(5)] == [None, None, "v", "v", "v"]


async def test_redis_cache_is_shared_between_workers_and_namespaced() -> None:
    need_redis()
    prefix = f"t{time.monotonic_ns()}:"
    one, two, other = RedisCache(REDIS_URL, prefix=prefix), RedisCache(REDIS_URL, prefix=prefix), \
        RedisCache(REDIS_URL, prefix=prefix + "other:")
    try:
        await one.set("k", "v", 30)
        assert await two.get("k") == "v"
        assert await other.get("k") is None
        await two.delete("k")
        assert await one.get("k") is None
    finally:
        for c in (one, two, other):
            await c.close()


async def test_redis_down_is_a_clean_503_fast() -> None:
    c = RedisCache(f"redis://127.0.0.1:{free_port()}/0")
    try:
        for op in (c.get("k"), c.get_guarded("a", "b"), c.set("k", "v", 1), c.delete("k"),
                   c.set_unless("k", "v", 1, guard="g")):
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable) as info:
                await op
            assert time.monotonic() - started < 1.5
            assert info.value.status == 503 and info.value.instance_code == "cache_unavailable"
            body = render_json(info.value).body
            assert b'"type":"server_error"' in bytes(body) and b"retry shortly" in bytes(body)
    finally:
        await c.close()


async def test_redis_connection_killed_reconnects_without_an_error() -> None:
    """What a Redis restart does to pooled connections: the next command still succeeds."""
    need_redis()
    import redis.asyncio as aioredis

    c = RedisCache(REDIS_URL, prefix=f"t{time.monotonic_ns()}:")
    admin = aioredis.Redis.from_url(REDIS_URL)
    try:
        await c.set("k", "v", 30)
        conn_id = await c.client.client_id()  # the pool holds exactly this one connection
        assert await admin.client_kill_filter(_id=conn_id) == 1
        assert await c.get("k") == "v"
        assert await c.set_unless("k2", "v", 30, guard="g") is True
    finally:
        await c.close()
        await admin.aclose()


# --- Store contract -----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no tables yet."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    with fresh_pg_database(migrated=False) as url:
        yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = Store(db_url)
    await s.migrate()
    yield s
    await s.close()


async def _table_names(conn: AsyncConnection) -> set[str]:
    return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))


async def test_migrations_build_exactly_the_schema(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    s = Store(db_url)
    try:
        assert await s.migrations_current() is False
        await s.migrate()
        await s.migrate()  # idempotent
        assert await s.migrations_current() is True
        async with s.read() as conn:
            assert await _table_names(conn) == set(metadata.tables) | {"alembic_version"}
            # schema.py and the migration must agree, column by column, on each dialect.
            diffs = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), metadata))
        assert diffs == []
    finally:
        await s.close()


async def test_migration_0002_keeps_the_rows_and_rebuilds_by_key(db_url: str) -> None:
    """A database made by 0001, holding money rows, upgraded in place: every row is still
    there, SQLite's request tables are WITHOUT ROWID, and the downgrade gives 0001 back."""
    from alembic import command

    from tollway.store.db import _alembic_config

    rows = {
        "tenants": [{"id": "tn_m", "created_at": 1}],
        "ledger_entries": [{"id": f"req_{i:04d}:reserve", "tenant_id": "tn_m", "kind": "reserve",
                            "amount_micros": -i, "balance_after_micros": i, "reference": None, "created_at": i}
                           for i in range(50)],
        "reservations": [{"request_id": "req_0001", "tenant_id": "tn_m", "key_id": None, "key_period": None,
                          "worker_id": "wk_1", "amount_micros": 5, "created_at": 1}],
        "usage_events": [{"request_id": "req_0002", "tenant_id": "tn_m", "key_id": None, "model": "m",
                          "provider": "p", "prompt_tokens": 1, "completion_tokens": 2, "cached_tokens": 0,
                          "reasoning_tokens": 0, "cost_micros": 3, "estimated": False, "status": 200,
                          "error_type": None, "latency_ms": 4, "created_at": 5}],
    }

    def step(c: sa.Connection, fn: Any, rev: str) -> None:
        fn(_alembic_config(c), rev)

    def dump(c: sa.Connection) -> dict[str, list[dict[str, Any]]]:
        # The columns 0001 had: later migrations add others (checked below).
        return {name: [dict(r._mapping) for r in c.execute(
            sa.select(*(metadata.tables[name].c[k] for k in rows[name][0]))
            .order_by(*metadata.tables[name].primary_key))]
                for name in rows if name != "tenants"}

    def added(c: sa.Connection) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in c.execute(sa.select(usage_events.c.requested_model, usage_events.c.attempts))]

    def without_rowid(c: sa.Connection) -> set[str]:
        if c.dialect.name != "sqlite":
            return set()
        return {name for name, sql in c.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type='table'")
                if "WITHOUT ROWID" in sql}

    def indexes(c: sa.Connection) -> set[str]:
        return {ix["name"] for ix in sa.inspect(c).get_indexes("reservations")}

    s = Store(db_url)
    try:
        async with s.write() as conn:
            await conn.run_sync(step, command.upgrade, "0001")
            for name, values in rows.items():
                await conn.execute(metadata.tables[name].insert(), values)
            assert await conn.run_sync(indexes) == {"ix_reservations_created_at"}
        async with s.write() as conn:
            await conn.run_sync(step, command.upgrade, "head")
        async with s.read() as conn:
            assert await conn.run_sync(dump) == {k: v for k, v in rows.items() if k != "tenants"}
            assert await conn.run_sync(added) == [(None, 1)]  # 0005: rows from before it
            rebuilt = await conn.run_sync(without_rowid)
            assert await conn.run_sync(indexes) == set()
        assert rebuilt == ({"ledger_entries", "reservations", "usage_events"} if s.is_sqlite else set())
        async with s.write() as conn:
            await conn.run_sync(step, command.downgrade, "0001")
        async with s.read() as conn:
            assert await conn.run_sync(dump) == {k: v for k, v in rows.items() if k != "tenants"}
            assert await conn.run_sync(without_rowid) == set()
            assert await conn.run_sync(indexes) == {"ix_reservations_created_at"}
    finally:
        await s.close()


async def test_concurrent_migrations_apply_once(db_url: str) -> None:
    """Several hosts running `tollway migrate` at once (advisory lock on PostgreSQL)."""
    stores = [Store(db_url) for _ in range(3)]
    try:
        await asyncio.gather(*(s.migrate() for s in stores))
        assert all([await s.migrations_current() for s in stores])
    finally:
        for s in stores:
            await s.close()


async def test_write_commits_and_rolls_back(store: Store) -> None:
    async with store.write() as conn:
        await conn.execute(tenants.insert().values(id="tn_1", created_at=1))
    with pytest.raises(RuntimeError):
        async with store.write() as conn:
            await conn.execute(tenants.insert().values(id="tn_2", created_at=1))
            raise RuntimeError("boom")
    async with store.read() as conn:
        ids = (await conn.execute(sa.select(tenants.c.id))).scalars().all()
    assert ids == ["tn_1"]
    assert store.queries >= 3


async def test_transact_commits_each_callers_work_alone(store: Store) -> None:
    """Concurrent transact() calls: on SQLite they share COMMITs (group commit), yet each
    caller's work commits or rolls back on its own, and each gets its own outcome."""

    def insert(conn: sa.Connection, i: int) -> str:
        conn.execute(tenants.insert().values(id=f"tn_{i}", created_at=i))
        if i % 5 == 0:
            raise RuntimeError(f"boom {i}")  # after writing: the write must vanish
        if i % 7 == 0:
            conn.execute(tenants.insert().values(id="tn_1", created_at=i))  # duplicate id
        return f"tn_{i}"

    outcomes = await asyncio.gather(*(store.transact(insert, i) for i in range(1, 61)), return_exceptions=True)
    for i, outcome in enumerate(outcomes, start=1):
        if i % 5 == 0:
            assert isinstance(outcome, RuntimeError) and str(outcome) == f"boom {i}"
        elif i % 7 == 0:
            assert isinstance(outcome, sa.exc.IntegrityError)
        else:
            assert outcome == f"tn_{i}"
    async with store.read() as conn:
        ids = set((await conn.execute(sa.select(tenants.c.id))).scalars().all())
    assert ids == {f"tn_{i}" for i in range(1, 61) if i % 5 and i % 7}
    if store.writer is not None:
        assert store.writer.transactions == 60
        assert store.writer.batches < 60  # they did share commits


async def test_sqlite_wal_stays_bounded_under_steady_writes(tmp_path: Path) -> None:
    """SQLite restarts the WAL only after a checkpoint that caught up with the last frame;
    a design whose checkpoints never catch up (one tried here) grows it without end."""
    store = Store(f"sqlite:///{tmp_path / 'wal.db'}")
    await store.migrate()
    try:
        def insert(conn: sa.Connection, i: int) -> None:
            conn.execute(tenants.insert().values(id=f"tn_{i}", name="x" * 2000, created_at=i))

        for i in range(2000):  # one COMMIT each: ~35 MB of WAL frames if the WAL never restarted
            await store.transact(insert, i)
        wal = tmp_path / "wal.db-wal"
        # RESTART_FRAMES is ~4 MB; runs here end at 4.5-6 MB, and once at 8.3 MB when the
        # checkpoint thread was slow to get its turn. Never restarting: 34.6 MB (measured).
        assert wal.stat().st_size < 12_000_000, wal.stat().st_size
    finally:
        await store.close()


@pytest.fixture
async def sqlite_and_other(tmp_path: Path) -> AsyncIterator[tuple[Store, sqlite3.Connection]]:
    """A migrated SQLite store, and a second plain connection to its file (in effect
    another process's) to hold the write lock with."""
    path = tmp_path / "lock.db"
    store = Store(f"sqlite:///{path}")
    await store.migrate()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        yield store, other
    finally:
        other.close()
        await store.close()


def _insert_tenant(conn: sa.Connection, i: int) -> int:
    conn.execute(tenants.insert().values(id=f"tn_{i}", created_at=i))
    return i


async def test_sqlite_writer_waits_for_a_held_write_lock_then_gives_up_with_503(
        sqlite_and_other: tuple[Store, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch) -> None:
    """Another connection (here: another process's, in effect) holds the write lock: the
    writer gets it within milliseconds of its release; held past BUSY_WAIT, a clean 503."""
    from tollway.store import sqlite_writer

    store, other = sqlite_and_other
    other.execute("BEGIN IMMEDIATE")
    pending = asyncio.ensure_future(store.transact(_insert_tenant, 1))
    await asyncio.sleep(0.3)
    assert not pending.done()
    other.execute("COMMIT")
    released = time.monotonic()
    assert await pending == 1
    assert time.monotonic() - released < 0.05

    monkeypatch.setattr(sqlite_writer, "BUSY_WAIT", 0.2)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(ServiceUnavailable):
        await store.transact(_insert_tenant, 2)
    other.execute("ROLLBACK")
    assert await store.transact(_insert_tenant, 3) == 3  # and it recovers at once


async def test_sqlite_writer_keeps_the_loop_running_while_the_lock_is_held(
        sqlite_and_other: tuple[Store, sqlite3.Connection]) -> None:
    """The writer runs on the event loop but never waits there: while another connection
    holds the write lock for 300 ms, a 5 ms ticker on the same loop keeps ticking, and a
    caller cancelled while waiting for its turn leaves nothing behind."""
    store, other = sqlite_and_other
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.ensure_future(ticker())
    other.execute("BEGIN IMMEDIATE")
    waiting = asyncio.ensure_future(store.transact(_insert_tenant, 1))
    abandoned = asyncio.ensure_future(store.transact(_insert_tenant, 2))
    await asyncio.sleep(0.15)
    abandoned.cancel()
    await asyncio.sleep(0.15)
    other.execute("COMMIT")
    assert await waiting == 1
    ticking.cancel()
    assert len(gaps) > 30 and max(gaps) < 0.1, (len(gaps), max(gaps))
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    async with store.read() as conn:
        ids = set((await conn.execute(sa.select(tenants.c.id))).scalars().all())
    assert ids == {"tn_1"}  # the cancelled caller's transaction never ran


async def test_errors_that_are_not_outages_pass_through(store: Store) -> None:
    async with store.write() as conn:
        await conn.execute(tenants.insert().values(id="tn_1", created_at=1))
    with pytest.raises(sa.exc.IntegrityError):
        async with store.write() as conn:
            await conn.execute(tenants.insert().values(id="tn_1", created_at=2))
    with pytest.raises(sa.exc.DBAPIError) as info:
        async with store.read() as conn:
            await conn.execute(sa.text("SELECT no_such_column FROM tenants"))
    assert not isinstance(info.value, ServiceUnavailable)
    with pytest.raises(sa.exc.IntegrityError):  # the CHECK keeps balances >= 0
        async with store.write() as conn:
            await conn.execute(wallets.insert().values(tenant_id="tn_1", balance_micros=-1, updated_at=1))


async def test_conditional_update_is_atomic_across_workers(db_url: str) -> None:
    """Two engines stand for two worker processes: 40 racing conditional debits against a
    balance of 10 succeed exactly 10 times, never below zero."""
    workers = [Store(db_url), Store(db_url)]
    try:
        await workers[0].migrate()
        async with workers[0].write() as conn:
            await conn.execute(tenants.insert().values(id="tn_1", created_at=1))
            await conn.execute(wallets.insert().values(tenant_id="tn_1", balance_micros=10, updated_at=1))

        async def take(s: Store) -> bool:
            async with s.write() as conn:
                new = (await conn.execute(
                    wallets.update().where(wallets.c.tenant_id == "tn_1", wallets.c.balance_micros >= 1)
                    .values(balance_micros=wallets.c.balance_micros - 1).returning(wallets.c.balance_micros)
                )).scalar()
            return new is not None

        results = await asyncio.gather(*(take(workers[i % 2]) for i in range(40)))
        assert sum(results) == 10
        async with workers[1].read() as conn:
            assert (await conn.execute(sa.select(wallets.c.balance_micros))).scalar_one() == 0
    finally:
        for s in workers:
            await s.close()


async def test_database_down_is_a_clean_503(tmp_path: Path) -> None:
    missing_dir = tmp_path / "no" / "such" / "dir"
    for url in (f"postgresql://postgres@127.0.0.1:{free_port()}/test", f"sqlite:///{missing_dir}/x.db"):
        s = Store(url)
        try:
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable) as info:
                async with s.read() as conn:
                    await conn.execute(sa.text("SELECT 1"))
            assert time.monotonic() - started < 6
            assert info.value.status == 503 and info.value.instance_code == "database_unavailable"
            with pytest.raises(ServiceUnavailable):
                async with s.write():
                    pass
        finally:
            await s.close()
    # aiosqlite leaves the thread of a connection that failed to open running until the
    # connection is collected, which then stops it through this loop: collect it now, not
    # during a later test, after this loop is closed.
    gc.collect()
    await asyncio.sleep(0.05)


async def test_sqlite_still_locked_after_busy_timeout_is_a_503(tmp_path: Path) -> None:
    """Another process holding SQLite's write lock for too long: a 503, not a 500."""
    path = tmp_path / "locked.db"
    store = Store(f"sqlite:///{path}")
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await store.migrate()
        async with store.read() as conn:  # the pool hands this same connection out next
            await conn.execute(sa.text("PRAGMA busy_timeout = 50"))
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(ServiceUnavailable) as info:
            async with store.write() as conn:
                await conn.execute(tenants.insert().values(id="tn_1", created_at=1))
        assert getattr(info.value.__cause__, "orig", None).sqlite_errorname == "SQLITE_BUSY"  # type: ignore[union-attr]
        other.execute("ROLLBACK")
        async with store.write() as conn:  # and it works again once the lock is gone
            await conn.execute(tenants.insert().values(id="tn_1", created_at=1))
    finally:
        other.close()
        await store.close()


# --- PostgreSQL: killed sessions, as in a restart ---------------------------------------------------


@pytest.fixture
async def pg_store() -> AsyncIterator[Store]:
    with fresh_pg_database() as url:
        s = Store(url, pool_size=2, pool_timeout=0.3)
        yield s
        await s.close()


async def _terminate(store: Store, pid: int) -> None:
    import asyncpg

    from tests.conftest import PG_ADMIN_URL

    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid) is True
    finally:
        await admin.close()


async def _pid(conn: AsyncConnection) -> int:
    return int((await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())


async def test_pg_idle_connections_killed_are_replaced_silently(pg_store: Store) -> None:
    """What a restart does to an idle pool: every pooled connection is dead when the
    next request comes, at least a second later."""
    async with pg_store.read() as c1, pg_store.read() as c2:
        pids = [await _pid(c1), await _pid(c2)]
    for pid in pids:
        await _terminate(pg_store, pid)
    await asyncio.sleep(IDLE_PING_AFTER + 0.1)
    for _ in range(3):  # none of this may fail
        async with pg_store.write() as conn:
            assert await _pid(conn) not in pids


async def test_pg_connections_in_steady_use_cost_no_ping(pg_store: Store) -> None:
    for _ in range(20):
        async with pg_store.read() as conn:
            await conn.execute(sa.text("SELECT 1"))
    assert pg_store.pings == 0
    await asyncio.sleep(IDLE_PING_AFTER + 0.1)
    async with pg_store.read() as conn:
        await conn.execute(sa.text("SELECT 1"))
    assert pg_store.pings == 1  # idle long enough to have slept through a restart


async def test_pg_session_killed_mid_transaction_is_503_then_recovers(pg_store: Store) -> None:
    with pytest.raises(ServiceUnavailable) as info:
        async with pg_store.write() as conn:
            await conn.execute(tenants.insert().values(id="tn_lost", created_at=1))
            await _terminate(pg_store, await _pid(conn))
            await conn.execute(sa.text("SELECT 1"))
    assert info.value.instance_code == "database_unavailable"
    assert is_unavailable(info.value.__cause__)  # type: ignore[arg-type]
    async with pg_store.read() as conn:  # rolled back, and the next transaction works
        assert (await conn.execute(sa.select(sa.func.count()).select_from(tenants))).scalar_one() == 0


async def test_pg_pool_exhausted_is_503_not_a_hang(pg_store: Store) -> None:
    one = Prepared(sa.select(sa.literal_column("1")))
    assert await pg_store.statement(one, {}) == [(1,)]
    async with pg_store.read(), pg_store.read():  # pool 2, no overflow
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            async with pg_store.read():
                pass
        with pytest.raises(ServiceUnavailable):
            await pg_store.statement(one, {})
        assert time.monotonic() - started < 2
    assert await pg_store.statement(one, {}) == [(1,)]


async def test_pg_statement_on_a_killed_connection_is_503_then_recovers(pg_store: Store) -> None:
    one = Prepared(sa.select(sa.literal_column("1")))
    pid = (await pg_store.statement(Prepared(sa.select(sa.func.pg_backend_pid())), {}))[0][0]
    admin = await asyncpg.connect(pg_store.url)  # not one of the store's connections
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    outcomes = []
    for _ in range(4):
        try:
            outcomes.append(await pg_store.statement(one, {}))
        except ServiceUnavailable:
            outcomes.append("503")
    # A connection the server killed fails at most the statement on it, as a 503; the
    # pool replaces it and does not hand it out again.
    assert outcomes.count("503") <= 1 and outcomes[-2:] == [[(1,)], [(1,)]], outcomes


async def test_pg_statement_whose_connection_dies_mid_statement_is_503(pg_store: Store) -> None:
    sleep = Prepared(sa.select(sa.func.pg_sleep(sa.literal_column("30"))))
    sleeper = asyncio.create_task(pg_store.statement(sleep, {}))
    admin = await asyncpg.connect(pg_store.url)  # not one of the store's connections
    try:
        for _ in range(200):
            pid = await admin.fetchval("SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_sleep%' "
                                       "AND pid <> pg_backend_pid()")
            if pid:
                break
            await asyncio.sleep(0.02)
        assert pid and await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    with pytest.raises(ServiceUnavailable):
        await asyncio.wait_for(sleeper, 10)
    assert await pg_store.statement(Prepared(sa.select(sa.literal_column("1"))), {}) == [(1,)]


async def test_pg_statement_whose_checkout_fails_is_503() -> None:
    """A checkout the server turns away for now (here: too many connections for the role,
    53300, as a server starting up answers 57P03) or nothing listening is a 503 on the
    one-statement path too, not the driver's error as a 500."""
    need_postgres()
    role = "tollway_t_no_connections"
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            await admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
    finally:
        await admin.close()
    try:
        with fresh_pg_database() as url:
            for target in (url.replace("postgres@", f"{role}@", 1), "postgresql://postgres@127.0.0.1:9/test"):
                store = Store(target, pool_size=1, pool_timeout=0.3)
                try:
                    with pytest.raises(ServiceUnavailable):
                        await store.statement(Prepared(sa.select(sa.literal_column("1"))), {})
                finally:
                    await store.close()
    finally:
        admin = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        finally:
            await admin.close()


def test_transient_sqlstates_are_unavailable() -> None:
    class PgError(Exception):
        def __init__(self, sqlstate: str) -> None:
            super().__init__(sqlstate)
            self.sqlstate = sqlstate

    def wrapped(sqlstate: str) -> BaseException:
        return sa.exc.DBAPIError("SELECT 1", None, PgError(sqlstate))

    for transient in ("57P01", "57P03", "08006", "53300", "40001", "40P01", "25006"):
        assert is_unavailable(wrapped(transient)), transient
    for permanent in ("42P01", "42703", "22003", "23505"):
        assert not is_unavailable(wrapped(permanent)), permanent
    assert is_unavailable(ConnectionRefusedError())
    assert not is_unavailable(ValueError("a bug"))

    def sqlite_error(name: str) -> BaseException:
        orig = sqlite3.OperationalError(name)
        orig.sqlite_errorname = name
        return sa.exc.OperationalError("SELECT 1", None, orig)

    for transient in ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR_FSYNC", "SQLITE_FULL", "SQLITE_CANTOPEN"):
        assert is_unavailable(sqlite_error(transient)), transient
    assert not is_unavailable(sqlite_error("SQLITE_ERROR"))  # "no such column": a bug, not an outage


# --- retrying idempotent writes across an outage --------------------------------------------------


async def test_retry_while_unavailable_rides_out_a_short_outage() -> None:
    calls: list[float] = []

    async def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise ServiceUnavailable("down", code="database_unavailable")
        return "done"

    assert await retry_while_unavailable(flaky, within=5, first_delay=0.01) == "done"
    assert len(calls) == 4
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps == sorted(gaps)  # backing off


async def test_retry_while_unavailable_gives_up_and_passes_other_errors() -> None:
    async def down() -> Any:
        raise ServiceUnavailable("down")

    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        await retry_while_unavailable(down, within=0.3, first_delay=0.05)
    assert 0.1 < time.monotonic() - started < 1.0

    attempts = 0

    async def bug() -> Any:
        nonlocal attempts
        attempts += 1
        raise ValueError("not an outage")

    with pytest.raises(ValueError):
        await retry_while_unavailable(bug, within=5)
    assert attempts == 1
