"""What one request's money writes cost, by access path.

    python bench/ledger_paths.py [-n 2000] [--postgres]

The gateway spends most of its CPU per request in the ledger's two write transactions
(reserve, settle). This takes the same transactions on the real schema (migrated by
Store.migrate) several ways. Each is still one atomic transaction per step with the
conditional wallet UPDATE, so ledger/transactions.py's concurrency argument holds for all of them;
nothing is batched.

SQLite (default):
  current   Ledger.reserve + Ledger.settle as the gateway runs them: Store.transact, the
            writer of store/sqlite_writer.py on the event loop, prepared statements.
  one-hop   the same Core statements, built once, on a sync pysqlite connection; each
            whole transaction is one call on a dedicated thread: 2 hops per request.
  raw       the same SQL as literal strings on sqlite3, one hop per transaction.
  in-loop   raw, run on the event loop's own thread: no hop at all. The floor; only safe
            if lock waits (other worker processes) and WAL checkpoints (fsync) are kept
            off the loop, e.g. busy_timeout=0 + async retry, checkpoints on a thread.

PostgreSQL (--postgres; a throw-away database on 127.0.0.1:5432):
  current   Ledger.reserve + Ledger.settle over asyncpg: BEGIN, 3-4 statements, COMMIT,
            each a round trip.
  one-stmt  each transaction as ONE statement (data-modifying CTEs, atomic on their own):
            one round trip per step. (Sketch: the rare "charge exceeds hold + balance"
            path and key spend limits would fall back to the current code.)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect

from tollway.ledger.transactions import Ledger
from tollway.store.db import Store
from tollway.store.schema import ledger_entries, reservations, tenants, usage_events, wallets

USAGE = {"key_id": "key_x", "model": "bench/json", "provider": "nginx_json", "prompt_tokens": 19,
         "completion_tokens": 10, "cached_tokens": 0, "reasoning_tokens": 0, "estimated": False, "status": 200,
         "error_type": None, "latency_ms": 1}
HOLD, CHARGE = 5000, 17
TENANT = "tn_bench"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"

_P = sa.bindparam
RESERVE = (wallets.update().where(wallets.c.tenant_id == _P("tenant"), wallets.c.balance_micros >= _P("amount"))
           .values(balance_micros=wallets.c.balance_micros - _P("amount"), updated_at=_P("ts"))
           .returning(wallets.c.balance_micros))
TAKE = (wallets.update()
        .where(wallets.c.tenant_id == _P("tenant"), wallets.c.balance_micros + _P("held") >= _P("charge"))
        .values(balance_micros=wallets.c.balance_micros + _P("held") - _P("charge"), updated_at=_P("ts"))
        .returning(wallets.c.balance_micros))
UNRESERVE = (reservations.delete().where(reservations.c.request_id == _P("rid"))
             .returning(reservations.c.tenant_id, reservations.c.amount_micros))
INSERT_ENTRY = ledger_entries.insert()
INSERT_RESERVATION = reservations.insert()
INSERT_USAGE = sqlite_dialect.insert(usage_events).on_conflict_do_nothing()

PG_RESERVE = """
WITH w AS (UPDATE wallets SET balance_micros = balance_micros - $2, updated_at = $3
           WHERE tenant_id = $1 AND balance_micros >= $2 RETURNING balance_micros),
 e AS (INSERT INTO ledger_entries (id, tenant_id, kind, amount_micros, balance_after_micros, reference, created_at)
       SELECT $4 || ':reserve', $1, 'reserve', -$2, balance_micros, $4, $3 FROM w),
 r AS (INSERT INTO reservations (request_id, tenant_id, key_id, key_period, worker_id, amount_micros, created_at)
       SELECT $4, $1, 'key_x', NULL, 'wk_bench', $2, $3 FROM w)
SELECT balance_micros FROM w"""
PG_SETTLE = """
WITH d AS (DELETE FROM reservations WHERE request_id = $1 RETURNING tenant_id, amount_micros),
 w AS (UPDATE wallets SET balance_micros = wallets.balance_micros + d.amount_micros - $2, updated_at = $3
       FROM d WHERE wallets.tenant_id = d.tenant_id AND wallets.balance_micros + d.amount_micros >= $2
       RETURNING wallets.balance_micros, d.tenant_id, d.amount_micros),
 e AS (INSERT INTO ledger_entries (id, tenant_id, kind, amount_micros, balance_after_micros, reference, created_at)
       SELECT $1 || ':release', tenant_id, 'release', amount_micros, balance_micros + $2, $1, $3 FROM w
       UNION ALL SELECT $1 || ':debit', tenant_id, 'debit', -$2, balance_micros, $1, $3 FROM w),
 u AS (INSERT INTO usage_events (request_id, tenant_id, key_id, model, provider, prompt_tokens, completion_tokens,
         cached_tokens, reasoning_tokens, cost_micros, estimated, status, error_type, latency_ms, created_at)
       SELECT $1, tenant_id, 'key_x', 'bench/json', 'nginx_json', 19, 10, 0, 0, $2, false, 200, NULL, 1, $3 FROM w
       ON CONFLICT DO NOTHING)
SELECT balance_micros FROM w"""


def now_ms() -> int:
    return int(time.time() * 1000)


def reserve_core(conn: sa.Connection, rid: str) -> None:
    ts = now_ms()
    conn.exec_driver_sql("BEGIN IMMEDIATE")
    new = conn.execute(RESERVE, {"tenant": TENANT, "amount": HOLD, "ts": ts}).scalar()
    assert new is not None
    conn.execute(INSERT_ENTRY, {"id": f"{rid}:reserve", "tenant_id": TENANT, "kind": "reserve",
                                "amount_micros": -HOLD, "balance_after_micros": new, "reference": rid,
                                "created_at": ts})
    conn.execute(INSERT_RESERVATION, {"request_id": rid, "tenant_id": TENANT, "key_id": "key_x", "key_period": None,
                                      "worker_id": "wk_bench", "amount_micros": HOLD, "created_at": ts})
    conn.exec_driver_sql("COMMIT")


def settle_core(conn: sa.Connection, rid: str) -> None:
    ts = now_ms()
    conn.exec_driver_sql("BEGIN IMMEDIATE")
    res = conn.execute(UNRESERVE, {"rid": rid}).first()
    assert res is not None
    tenant, held = res.tenant_id, int(res.amount_micros)
    new = conn.execute(TAKE, {"tenant": tenant, "held": held, "charge": CHARGE, "ts": ts}).scalar()
    assert new is not None
    conn.execute(INSERT_ENTRY, [
        {"id": f"{rid}:release", "tenant_id": tenant, "kind": "release", "amount_micros": held,
         "balance_after_micros": new + CHARGE, "reference": rid, "created_at": ts},
        {"id": f"{rid}:debit", "tenant_id": tenant, "kind": "debit", "amount_micros": -CHARGE,
         "balance_after_micros": new, "reference": rid, "created_at": ts}])
    conn.execute(INSERT_USAGE, {**USAGE, "request_id": rid, "tenant_id": tenant, "cost_micros": CHARGE,
                                "created_at": ts})
    conn.exec_driver_sql("COMMIT")


def reserve_raw(db: sqlite3.Connection, rid: str) -> None:
    ts = now_ms()
    db.execute("BEGIN IMMEDIATE")
    new = db.execute("UPDATE wallets SET balance_micros = balance_micros - ?, updated_at = ? "
                     "WHERE tenant_id = ? AND balance_micros >= ? RETURNING balance_micros",
                     (HOLD, ts, TENANT, HOLD)).fetchone()[0]
    db.execute("INSERT INTO ledger_entries (id, tenant_id, kind, amount_micros, balance_after_micros, reference, "
               "created_at) VALUES (?, ?, 'reserve', ?, ?, ?, ?)", (f"{rid}:reserve", TENANT, -HOLD, new, rid, ts))
    db.execute("INSERT INTO reservations (request_id, tenant_id, key_id, key_period, worker_id, amount_micros, "
               "created_at) VALUES (?, ?, 'key_x', NULL, 'wk_bench', ?, ?)", (rid, TENANT, HOLD, ts))
    db.execute("COMMIT")


def settle_raw(db: sqlite3.Connection, rid: str) -> None:
    ts = now_ms()
    db.execute("BEGIN IMMEDIATE")
    tenant, held = db.execute("DELETE FROM reservations WHERE request_id = ? RETURNING tenant_id, amount_micros",
                              (rid,)).fetchone()
    new = db.execute("UPDATE wallets SET balance_micros = balance_micros + ? - ?, updated_at = ? "
                     "WHERE tenant_id = ? AND balance_micros + ? >= ? RETURNING balance_micros",
                     (held, CHARGE, ts, tenant, held, CHARGE)).fetchone()[0]
    db.executemany("INSERT INTO ledger_entries (id, tenant_id, kind, amount_micros, balance_after_micros, "
                   "reference, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   [(f"{rid}:release", tenant, "release", held, new + CHARGE, rid, ts),
                    (f"{rid}:debit", tenant, "debit", -CHARGE, new, rid, ts)])
    cols = ", ".join(USAGE)
    db.execute(f"INSERT INTO usage_events ({cols}, request_id, tenant_id, cost_micros, created_at) "
               f"VALUES ({', '.join('?' * (len(USAGE) + 4))}) ON CONFLICT DO NOTHING",
               (*USAGE.values(), rid, tenant, CHARGE, ts))
    db.execute("COMMIT")


async def timed(name: str, n: int, step: Callable[[str], Awaitable[None]]) -> float:
    for i in range(50):
        await step(f"warm_{name}_{i}")
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(n):
        await step(f"req_{name}_{i}")
    per = 1e6 * (time.process_time() - c0) / n
    print(f"  {name:<9} {per:8.1f} us CPU  {1e6 * (time.perf_counter() - w0) / n:8.1f} us wall "
          f"per reserve + settle", flush=True)
    return per


async def ledger_with_wallet(url: str) -> tuple[Store, Ledger]:
    store = Store(url)
    await store.migrate()
    ledger = Ledger(store)
    async with store.write() as conn:
        await conn.execute(tenants.insert().values(id=TENANT, name="bench", created_at=now_ms()))
        await ledger.open_wallet(conn, TENANT)
    await ledger.credit_manual(TENANT, 10**15, "bench")
    return store, ledger


async def current(ledger: Ledger, rid: str) -> None:
    await ledger.reserve(TENANT, rid, HOLD, key_id="key_x", worker_id="wk_bench")
    await ledger.settle(rid, CHARGE, usage=USAGE)


async def run_sqlite(workdir: Path, n: int) -> None:
    path = workdir / "paths.db"
    store, ledger = await ledger_with_wallet(f"sqlite:///{path}")
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one thread owns each sync connection
    engine = sa.create_engine(f"sqlite:///{path}")
    sync_conn: Any = await loop.run_in_executor(pool, engine.connect)
    sync_conn.connection.dbapi_connection.isolation_level = None  # BEGIN is ours, as in db.py

    async def one_hop(rid: str) -> None:
        await loop.run_in_executor(pool, reserve_core, sync_conn, rid)
        await loop.run_in_executor(pool, settle_core, sync_conn, rid)

    def connect() -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=10000", "foreign_keys=ON"):
            db.execute(f"PRAGMA {pragma}")
        return db

    raw_db = await loop.run_in_executor(pool, connect)

    async def raw(rid: str) -> None:
        await loop.run_in_executor(pool, reserve_raw, raw_db, rid)
        await loop.run_in_executor(pool, settle_raw, raw_db, rid)

    loop_db = connect()

    async def in_loop(rid: str) -> None:
        reserve_raw(loop_db, rid)
        settle_raw(loop_db, rid)

    print(f"SQLite (WAL, synchronous=NORMAL), {n} requests each:")
    await timed("current", n, lambda rid: current(ledger, rid))
    await timed("one-hop", n, one_hop)
    await timed("raw", n, raw)
    await timed("in-loop", n, in_loop)
    loop_db.close()
    await loop.run_in_executor(pool, sync_conn.close)
    await loop.run_in_executor(pool, raw_db.close)
    pool.shutdown()
    engine.dispose()
    problems = await ledger.verify(3_600_000)
    print("  ledger verify:", "ok" if not problems else problems[:3])
    await store.close()


async def run_postgres(n: int) -> None:
    import asyncpg

    name = "tollway_bench_paths_" + os.urandom(4).hex()
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    try:
        store, ledger = await ledger_with_wallet(url)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)

        async def one_stmt(rid: str) -> None:
            ts = now_ms()
            async with pool.acquire() as c:
                assert await c.fetchval(PG_RESERVE, TENANT, HOLD, ts, rid) is not None
            async with pool.acquire() as c:
                assert await c.fetchval(PG_SETTLE, rid, CHARGE, ts) is not None

        print(f"PostgreSQL (127.0.0.1), {n} requests each:")
        await timed("current", n, lambda rid: current(ledger, rid))
        await timed("one-stmt", n, one_stmt)
        await pool.close()
        problems = await ledger.verify(3_600_000)
        print("  ledger verify:", "ok" if not problems else problems[:3])
        await store.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--postgres", action="store_true", help="also PostgreSQL on 127.0.0.1:5432 (user postgres)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tollway-ledger-paths-"))
    try:
        import uvloop

        uvloop.run(run_sqlite(workdir, args.n))
        if args.postgres:
            uvloop.run(run_postgres(args.n))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
