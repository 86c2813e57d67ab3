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
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

T = TypeVar("T")
_Op = tuple[Callable[[Connection], Any], asyncio.Future[Any]]

# Bounds one COMMIT's size so a burst cannot make the first caller of a batch wait long.
MAX_BATCH = 64


class SQLiteWriter:
    def __init__(self, path: Path) -> None:
        self.engine: Engine = sa.create_engine(f"sqlite:///{path}", pool_size=1, max_overflow=0,
                                               connect_args={"check_same_thread": False})
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


def _deliver(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for done, result, exc in outcomes:
        if done.done():
            continue
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)
