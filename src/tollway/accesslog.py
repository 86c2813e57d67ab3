"""The access log: one row per HTTP request, written in batches off the request path.

A row holds the fields allow-listed in privacy.py: time, request id, method, route,
status, client IP, latency and tenant. The path column holds the route *template*
("/admin/tenants/{tenant_id}", "/v1/chat/completions"), never the raw URL: a URL is text
the client chose and may carry anything, and templates keep the set of values bounded
(the same value labels the request metrics).

The edge (edge.py) only appends a dict to a list; a background task inserts the list with
one executemany every `flush_every` seconds, or sooner once `batch_rows` are waiting, and
once more at shutdown. If the database is down the rows wait (up to `max_buffer`, then
the oldest are dropped and counted in tollway_access_log_dropped_rows_total): the access
log is a debugging aid, never a reason to slow or fail a request. Money is not here; the
ledger writes its own rows synchronously.

Rows of a tenant whose deletion was requested lose their tenant id and IP at flush time,
so a stream that was still running when the tenant was deleted cannot write them back.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from starlette.routing import Mount
from starlette.types import Scope

from tollway import telemetry
from tollway.erasure import deletion_record_id
from tollway.store.db import Store
from tollway.store.prepared import Prepared
from tollway.store.schema import access_log, deletion_requests

UNMATCHED = "unmatched"


def route_template(scope: Scope) -> str:
    """The template of the route that handled the request (set by Starlette's router)."""
    route = scope.get("route")
    if route is None:
        return UNMATCHED
    root = scope.get("root_path", "") or ""
    if isinstance(route, Mount):
        # Matched the mount but no route inside it: name the mount, not the URL.
        return (root or route.path).rstrip("/") + "/*"
    path = getattr(route, "path", None)
    return (root + path)[:200] if isinstance(path, str) else UNMATCHED


class AccessLogWriter:
    def __init__(self, store: Store, *, flush_every: float = 1.0, batch_rows: int = 500,
                 max_buffer: int = 50_000) -> None:
        self.store = store
        self.flush_every = flush_every
        self.batch_rows = batch_rows
        self.max_buffer = max_buffer
        self._rows: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add(self, row: dict[str, Any]) -> None:
        if len(self._rows) >= self.max_buffer:
            telemetry.ACCESS_LOG_DROPPED.inc()
            return
        self._rows.append(row)
        if len(self._rows) >= self.batch_rows:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._rows)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_every)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                telemetry.log.warning("access_log_flush_failed", count=len(self._rows), exc_info=True)

    async def flush(self) -> int:
        """Insert every waiting row in one transaction; on failure they wait for the next try."""
        rows, self._rows = self._rows, []
        if not rows:
            return 0
        try:
            await self.store.transact(_insert_rows, rows)
        except BaseException:
            self._requeue(rows)
            raise
        return len(rows)

    def _requeue(self, rows: list[dict[str, Any]]) -> None:
        merged = rows + self._rows
        overflow = len(merged) - self.max_buffer
        if overflow > 0:
            telemetry.ACCESS_LOG_DROPPED.inc(overflow)
            merged = merged[overflow:]
        self._rows = merged

    async def close(self) -> None:
        """Stop the loop and write what is left (called at shutdown, after the last request)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        try:
            await self.flush()
        except Exception:
            telemetry.ACCESS_LOG_DROPPED.inc(len(self._rows))
            telemetry.log.warning("access_log_lost_at_shutdown", count=len(self._rows), exc_info=True)
            self._rows = []


_INSERT = Prepared(access_log.insert())


def _insert_rows(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """One transaction through Store.transact, the same path as the ledger's writes: the
    rows go to the database in one executemany on the cursor. (Through SQLAlchemy's async
    engine, 500 rows cost ~12 ms of the event loop's time, a stall every second that was
    most of the p99 at one connection; docs/performance-history.md.)"""
    records = {deletion_record_id(t): t for t in {r["tenant_id"] for r in rows if r["tenant_id"]}}
    if records:
        found = conn.execute(sa.select(deletion_requests.c.tenant_id).where(
            deletion_requests.c.tenant_id.in_([*records, *records.values()]))).scalars().all()
        deleted = {records.get(f, f) for f in found}
        for r in rows:
            if r["tenant_id"] in deleted:
                r["tenant_id"] = None
                r["client_ip"] = None
    _INSERT.many(conn, rows)
