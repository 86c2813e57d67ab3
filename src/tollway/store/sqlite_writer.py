"""The embedded database's money writer: one thread, one connection, group commit.

Each `run(fn)` is one logical write transaction (`fn(conn)` commits if it returns, rolls
back if it raises). Transactions submitted while the thread is busy are run together in
one SQLite transaction, each inside its own SAVEPOINT, and committed once; each caller
gets its own result or exception only after that COMMIT, so nothing is acknowledged
before it is durable, and one transaction's failure rolls back only its own savepoint.

Why a thread and not the event loop: SQLite calls block (a lock held by another
process, a checkpoint, a slow disk). Why batches: a hand-off between the loop and the
thread costs more CPU than the transaction itself on small machines (bench/README.md),
and under load one hand-off and one COMMIT then serve many requests.

Checkpoints (copying the WAL back into the database file) stay where SQLite puts them,
on the COMMIT that takes the WAL past 1,000 pages. Tried and reverted: a checkpoint
thread of its own. Under steady writes its checkpoints never caught up with the latest
frame, so SQLite never restarted the WAL, which grew by ~20 MB/s under load
(tests/test_store.py keeps it bounded now).

Waiting for the write lock: another connection (this process's access-log flush or
heartbeat, another process) may hold it. SQLite's busy_timeout sleeps 1, 2, then 5 ms
between tries, so a flush of a few milliseconds cost the requests behind it ~8 ms; the
writer instead tries BEGIN IMMEDIATE every BUSY_POLL seconds, for up to BUSY_WAIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, event

from tollway.store.prepared import as_sqlalchemy_error

T = TypeVar("T")
_Op = tuple[Callable[[Connection], Any], asyncio.Future[Any]]

# Bounds one COMMIT's size so a burst cannot make the first caller of a batch wait long.
MAX_BATCH = 64
BUSY_POLL = 0.0005      # seconds between tries for the write lock
BUSY_WAIT = 10.0        # then SQLITE_BUSY, which the store turns into a 503


class SQLiteWriter:
    def __init__(self, path: Path, *, on_connect: Callable[[Any, Any], None],
                 on_statement: Callable[..., None]) -> None:
        """`on_connect` sets up a connection like every other one of the store (pragmas);
        `on_statement` sees each statement (the store counts them)."""
        self.path = path
        self.engine: Engine = sa.create_engine(f"sqlite:///{path}", pool_size=1, max_overflow=0,
                                               connect_args={"check_same_thread": False})
        event.listen(self.engine, "connect", on_connect)
        event.listen(self.engine, "connect", _remember_busy_timeout)  # after on_connect sets it
        event.listen(self.engine, "begin", _begin_immediate)
        event.listen(self.engine, "before_cursor_execute", on_statement)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollway-sqlite-writer")
        self._lock = threading.Lock()  # guards _pending and _draining, shared with the thread
        self._pending: list[_Op] = []
        self._draining = False
        self.batches = 0  # COMMITs issued; with `transactions`, shows how much group commit saves
        self.transactions = 0

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn(conn)` as one transaction in the writer thread. A caller cancelled
        meanwhile still waits for the outcome before the CancelledError goes on, so that
        its clean-up (releasing a hold) sees it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._pending.append((fn, done))
            start = not self._draining
            self._draining = True
        if start:
            try:
                self._thread.submit(self._drain, loop)
            except RuntimeError:  # closed: fail this call, and let a later one try again
                with self._lock:
                    self._pending.remove((fn, done))
                    self._draining = False
                raise
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await done
            raise

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            with self._lock:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                if not batch:
                    self._draining = False
                    return
            outcomes = self._commit(batch)
            try:
                loop.call_soon_threadsafe(_deliver, outcomes)
            except RuntimeError:
                return  # the loop is closed: nobody is waiting any more

    def _commit(self, batch: list[_Op]) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            with self.engine.connect() as conn:
                conn.execution_options(tollway_write=True)
                with conn.begin():
                    if len(batch) == 1:
                        fn, done = batch[0]
                        outcomes.append((done, fn(conn), None))
                    else:
                        raw = conn.connection.driver_connection
                        assert raw is not None
                        for fn, done in batch:
                            raw.execute("SAVEPOINT op")
                            try:
                                outcomes.append((done, fn(conn), None))
                            except Exception as exc:
                                raw.execute("ROLLBACK TO op")
                                outcomes.append((done, None, exc))
                            raw.execute("RELEASE op")
        except Exception as exc:
            # BEGIN or COMMIT failed (or a lone transaction raised): nothing here was committed.
            outcomes = [(done, None, exc) for _, done in batch]
        self.batches += 1
        self.transactions += len(batch)
        return outcomes

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.engine.dispose()


def _remember_busy_timeout(dbapi_conn: Any, record: Any) -> None:
    record.info["busy_timeout"] = int(dbapi_conn.execute("PRAGMA busy_timeout").fetchone()[0])


def _begin_immediate(conn: Connection) -> None:
    """BEGIN IMMEDIATE, polling for the write lock instead of SQLite's coarse sleeps.
    Inside the transaction the connection's busy_timeout applies again (WAL readers and
    checkpoints can make a statement wait briefly)."""
    raw = conn.connection.driver_connection
    assert raw is not None
    timeout = int(conn.connection.info["busy_timeout"])
    raw.execute("PRAGMA busy_timeout=0")
    deadline = time.monotonic() + BUSY_WAIT
    try:
        while True:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                busy = getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY")
                if not busy or time.monotonic() > deadline:
                    raise as_sqlalchemy_error("BEGIN IMMEDIATE", exc) from exc
            time.sleep(BUSY_POLL)
    finally:
        raw.execute(f"PRAGMA busy_timeout={timeout}")


def _deliver(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for done, result, exc in outcomes:
        if done.done():
            continue
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)
