"""The embedded database's money writer: one connection, run on the event loop, with
group commit; checkpoints in a thread of their own.

Each `run(fn)` is one logical write transaction (`fn(conn)` commits if it returns, rolls
back if it raises). Transactions submitted in the same turn of the event loop are run
together in one SQLite transaction, each inside its own SAVEPOINT, and committed once;
each caller gets its own result or exception only after that COMMIT, so nothing is
acknowledged before it is durable, and one transaction's failure rolls back only its
own savepoint.

Why on the loop, and why that does not block it (docs/performance-history.md has the numbers):
a money transaction is a few statements on pages SQLite already holds in memory, and a
COMMIT appends the changed pages to the WAL without fsync (synchronous=NORMAL). Handing
each transaction to a thread cost more CPU than the transaction, mostly in waking
threads and passing the GIL. What can make SQLite wait is kept off the loop:
* the write lock, held by another connection (this process's access-log flush, another
  worker process, the CLI): the writer never waits on SQLite's busy handler (busy_timeout
  is 0 on its connection); it tries BEGIN IMMEDIATE and, if the lock is taken, tries again
  BUSY_POLL seconds later from a loop timer, for up to BUSY_WAIT, then answers 503;
* checkpoints (copying the WAL into the database file, with fsync): never run on the
  writer's connection (wal_autocheckpoint=0); a checkpoint thread copies what is there
  without blocking anyone (PASSIVE) and, once the WAL holds RESTART_FRAMES frames,
  checkpoints in RESTART mode so SQLite starts the WAL over. That needs the write lock,
  and SQLite's busy handler (a sleep-and-retry) would never catch it between the
  writer's back-to-back batches, so the writer stands aside (waits on its timer, as for
  any other holder) while the checkpoint thread says it wants the lock. (A checkpoint
  thread that only ever ran PASSIVE checkpoints was tried before: they never caught up
  with the last frame under steady writes, so SQLite never restarted the WAL, which grew
  by ~20 MB/s; tests/test_store.py keeps it bounded.)
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection, Engine, event

from tollway.store.prepared import STATEMENT_HOOK, as_sqlalchemy_error
from tollway.telemetry import log

T = TypeVar("T")
# (the transaction, its caller's future, what undoes its in-memory effects if it is rolled back)
_Op = tuple[Callable[[Connection], Any], asyncio.Future[Any], Callable[[], None] | None]
_Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]

# Bounds one COMMIT's size so a burst cannot make the first caller of a batch wait long.
MAX_BATCH = 64
BUSY_POLL = 0.0005      # seconds between tries for the write lock
BUSY_WAIT = 10.0        # then SQLITE_BUSY, which the store turns into a 503
# The checkpoint thread wakes this often, and sooner after CHECKPOINT_NUDGE commits.
CHECKPOINT_INTERVAL = 0.5
CHECKPOINT_NUDGE = 64
RESTART_FRAMES = 1000   # SQLite's own autocheckpoint threshold (~4 MB of WAL)
RESTART_WAIT_MS = 100   # the most a RESTART checkpoint (and so the writer) waits for readers; then later


class SQLiteWriter:
    def __init__(self, path: Path, *, on_connect: Callable[[Any, Any], None],
                 on_statement: Callable[[str], None]) -> None:
        """`on_connect` sets up a connection like every other one of the store (pragmas);
        `on_statement` sees the SQL of each statement (the store counts them), and so does
        anything added to `statement_observers` (tests)."""
        self.engine: Engine = sa.create_engine(f"sqlite:///{path}", pool_size=1, max_overflow=0,
                                               connect_args={"check_same_thread": False})
        event.listen(self.engine, "connect", on_connect)
        event.listen(self.engine, "connect", _writer_pragmas)  # after on_connect: overrides it
        self.statement_observers: list[Callable[[str], None]] = [on_statement]
        # Statements run through SQLAlchemy's execution arrive as events; those Prepared
        # runs on the cursor call the hook (prepared.py says why).
        event.listen(self.engine, "before_cursor_execute",
                     lambda _conn, _cursor, sql, *_: self._observe(sql))
        event.listen(self.engine, "connect", self._set_hook)
        self._conn: Connection | None = None
        self._pending: list[_Op] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None  # the loop a _drain is due on
        self._busy_since: float | None = None
        self._checkpointer = _Checkpointer(path)
        self.batches = 0  # COMMITs issued; with `transactions`, shows how much group commit saves
        self.transactions = 0

    def _observe(self, sql: str) -> None:
        for observer in self.statement_observers:
            observer(sql)

    def _set_hook(self, _dbapi: Any, record: Any) -> None:
        record.info[STATEMENT_HOOK] = self._observe

    async def run(self, fn: Callable[[Connection], T], undo: Callable[[], None] | None = None) -> T:
        """Run `fn(conn)` as one transaction.

        `undo`: for an `fn` that also changes this process's memory when it succeeds (the
        in-memory holds, ledger/holds.py): called, in the same step of the loop, if what `fn` did is
        rolled back after it returned (a failed COMMIT), so memory never disagrees with the
        database while anything else can run.

        Cancellation: a caller cancelled before its turn cancels its future, and a
        cancelled future's transaction is skipped, never run. Once run, it is committed
        and its outcome delivered in the same step of the loop; a cancellation that
        reaches the caller after that (the result is then lost to it) is one after the
        COMMIT, which callers already handle (the pipeline releases such a hold)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._pending.append((fn, done, undo))
        if self._scheduled is not loop:  # (a store may outlive an event loop: tests, the CLI)
            self._scheduled = loop
            loop.call_soon(self._drain, loop)
        return await done

    def read_now(self, fn: Callable[[Connection], T]) -> T:
        """Run a read on the writer's connection at once, outside any transaction (between
        batches it holds none: each batch commits in the loop step that began it). It sees
        every transaction this writer committed; WAL readers take no lock, so it never waits."""
        return fn(self._connection())

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit one batch of what is pending; schedule itself again while more is."""
        self._scheduled = None
        if not self._pending:
            return
        try:
            conn = self._connection()
            # Stand aside while the checkpoint thread waits for the lock to restart the WAL:
            # SQLite's busy handler polls, and would never catch the lock between our batches.
            locked = not self._checkpointer.wants_lock.is_set() and _try_begin_immediate(conn)
        except Exception as exc:
            self._fail(self._take(len(self._pending)), exc)
            return
        if not locked:
            now = time.monotonic()
            if self._busy_since is None:
                self._busy_since = now
            if now - self._busy_since > BUSY_WAIT:
                self._busy_since = None
                self._fail(self._take(len(self._pending)), _busy_error())
                return
            self._scheduled = loop
            loop.call_later(BUSY_POLL, self._drain, loop)
            return
        self._busy_since = None
        batch = [op for op in self._take(MAX_BATCH) if not op[1].cancelled()]
        if batch:
            _deliver(self._commit(conn, batch))
        else:
            _end_transaction(conn)
        if self._pending and self._scheduled is None:
            self._scheduled = loop
            loop.call_soon(self._drain, loop)  # let the loop run between batches

    def _take(self, n: int) -> list[_Op]:
        batch, self._pending = self._pending[:n], self._pending[n:]
        return batch

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.invalidated or self._conn.closed:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
            self._conn = self.engine.connect()
            self._checkpointer.ensure_started()
        return self._conn

    def _commit(self, conn: Connection, batch: list[_Op]) -> list[_Outcome]:
        """Runs inside the BEGIN IMMEDIATE that `_drain` issued; ends it."""
        outcomes: list[_Outcome] = []
        undo: list[Callable[[], None]] = []  # of the transactions that returned
        try:
            with conn.begin():  # no SQL (pysqlite's BEGIN is ours); COMMIT or ROLLBACK at the end
                if len(batch) == 1:
                    fn, done, on_rollback = batch[0]
                    outcomes.append((done, fn(conn), None))
                    if on_rollback:
                        undo.append(on_rollback)
                else:
                    raw = conn.connection.driver_connection
                    assert raw is not None
                    for fn, done, on_rollback in batch:
                        raw.execute("SAVEPOINT op")
                        try:
                            outcomes.append((done, fn(conn), None))
                            if on_rollback:
                                undo.append(on_rollback)
                        except Exception as exc:
                            raw.execute("ROLLBACK TO op")
                            outcomes.append((done, None, exc))
                        raw.execute("RELEASE op")
        except Exception as exc:
            # COMMIT failed (or a lone transaction raised): nothing here was committed.
            outcomes = [(done, None, exc) for _, done, _ in batch]
            _end_transaction(conn)
            for fn_undo in undo:
                fn_undo()
        self.batches += 1
        self.transactions += len(batch)
        if self.batches % CHECKPOINT_NUDGE == 0:
            self._checkpointer.nudge()
        return outcomes

    def _fail(self, batch: list[_Op], exc: BaseException) -> None:
        _deliver([(done, None, exc) for _, done, _ in batch])

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        self._fail(self._take(len(self._pending)), RuntimeError("the store is closed"))
        self._checkpointer.stop()
        self.engine.dispose()


class _Checkpointer:
    """The thread that checkpoints the WAL (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._wake = threading.Event()
        self.wants_lock = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def ensure_started(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tollway-sqlite-checkpoint", daemon=True)
            self._thread.start()

    def nudge(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
            while not self._stopping:
                self._wake.wait(CHECKPOINT_INTERVAL)
                self._wake.clear()
                if self._stopping:
                    break
                try:
                    self.checkpoint(conn)
                except sqlite3.Error:
                    # Busy or failed: the WAL keeps its frames, the next round tries again.
                    log.warning("sqlite_checkpoint_failed", exc_info=True)
        finally:
            conn.close()

    def checkpoint(self, conn: sqlite3.Connection) -> None:
        _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames >= RESTART_FRAMES:
            self.wants_lock.set()
            try:
                conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                self.wants_lock.clear()


def _writer_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.execute("PRAGMA busy_timeout=0")        # never sleep on the loop
    dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpoint thread does it


def _try_begin_immediate(conn: Connection) -> bool:
    """Take the write lock now or say it is taken."""
    raw = conn.connection.driver_connection
    assert raw is not None
    try:
        raw.execute("BEGIN IMMEDIATE")
        return True
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY"):
            return False
        raise as_sqlalchemy_error("BEGIN IMMEDIATE", exc) from exc


def _end_transaction(conn: Connection) -> None:
    raw = conn.connection.driver_connection
    if raw is not None and raw.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            raw.execute("ROLLBACK")


def _busy_error() -> Exception:
    exc = sqlite3.OperationalError("database is locked")
    exc.sqlite_errorname = "SQLITE_BUSY"
    return as_sqlalchemy_error("BEGIN IMMEDIATE", exc)


def _deliver(outcomes: list[_Outcome]) -> None:
    for done, result, exc in outcomes:
        if done.done():
            continue
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)
