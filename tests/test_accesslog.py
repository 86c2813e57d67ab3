"""The access log: metadata rows, route templates, batched writes, flush at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import ServerThread
from tollway import telemetry
from tollway.accesslog import AccessLogWriter
from tollway.app import create_app
from tollway.config import Config
from tollway.edge import Edge
from tollway.erasure import deletion_record_id
from tollway.errors import ServiceUnavailable
from tollway.store.db import Store, now_ms
from tollway.store.schema import access_log, deletion_requests

SECRET = "CANARY-accesslog-51c0"
TOKEN = "admin-token-for-tests-0123456789"


async def item(request: Request) -> Response:
    request.scope["state"]["tenant_id"] = "tn_fromproxy"
    return PlainTextResponse("ok")


async def boom(request: Request) -> Response:
    raise RuntimeError("handler failed")


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(200):
            yield f"data: {i}\n\n".encode()
            await asyncio.sleep(0.02)

    return StreamingResponse(chunks(), media_type="text/event-stream")


def make_app(store: Store, writer: AccessLogWriter) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await store.migrate()
        writer.start()
        try:
            yield
        finally:
            await writer.close()
            await store.close()

    app = Starlette(routes=[Route("/items/{item_id}", item), Route("/boom", boom, methods=["POST"]),
                            Route("/stream", stream)], lifespan=lifespan)
    app.add_middleware(Edge, writer=writer)
    return app


class Counted:
    """Counts INSERT statements into access_log (an executemany is one statement)."""

    def __init__(self, store: Store) -> None:
        self.inserts = 0
        event.listen(store.engine.sync_engine, "before_cursor_execute", self._seen)
        if store.writer is not None:  # SQLite: writes go through the store's writer (sqlite_writer.py)
            store.writer.statement_observers.append(self._seen_sql)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self._seen_sql(statement)

    def _seen_sql(self, statement: str) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO ACCESS_LOG"):
            self.inserts += 1


def rows(url: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        store = Store(url)
        try:
            async with store.read() as conn:
                result = await conn.execute(sa.select(access_log).order_by(access_log.c.id))
                return [dict(r) for r in result.mappings().all()]
        finally:
            await store.close()

    return asyncio.run(read())


@pytest.fixture
def db_url(backend: dict[str, Any]) -> str:
    return str(backend["database"]["url"])


@pytest.fixture
def served(db_url: str) -> Iterator[Callable[..., tuple[ServerThread, AccessLogWriter, Counted]]]:
    started: list[ServerThread] = []

    def start(**writer_options: Any) -> tuple[ServerThread, AccessLogWriter, Counted]:
        store = Store(db_url)
        writer = AccessLogWriter(store, **writer_options)
        server = ServerThread(make_app(store, writer)).start()
        started.append(server)
        return server, writer, Counted(store)

    yield start
    for s in started:
        s.stop()


def test_rows_hold_metadata_and_route_templates_only(served: Callable[..., Any], db_url: str) -> None:
    server, _, _ = served(flush_every=60)
    started = now_ms()
    r = httpx.get(server.url + f"/items/{SECRET}?q={SECRET}", headers={"x-note": SECRET})
    assert r.status_code == 200
    assert httpx.get(server.url + f"/nothing/{SECRET}").status_code == 404
    assert httpx.post(server.url + "/boom", content=SECRET).status_code == 500
    server.stop()  # shutdown flushes
    got = rows(db_url)
    assert SECRET not in repr(got)
    assert [(g["method"], g["path"], g["status"]) for g in got] == [
        ("GET", "/items/{item_id}", 200), ("GET", "unmatched", 404), ("POST", "/boom", 500)]
    first = got[0]
    assert first["request_id"] == r.headers["x-request-id"]
    assert first["client_ip"] == "127.0.0.1"
    assert first["tenant_id"] == "tn_fromproxy" and got[1]["tenant_id"] is None
    assert started - 1000 <= first["created_at"] <= now_ms()
    assert 0 <= first["latency_ms"] < 5000


def test_rows_are_batched_off_the_request_path_and_flushed_at_shutdown(served: Callable[..., Any],
                                                                        db_url: str) -> None:
    server, writer, counted = served(flush_every=60, batch_rows=10_000)
    with httpx.Client() as client:
        for i in range(25):
            assert client.get(server.url + f"/items/{i}").status_code == 200
    time.sleep(0.2)
    assert counted.inserts == 0 and writer.pending == 25  # nothing written while serving
    server.stop()
    assert counted.inserts == 1  # one executemany at shutdown
    assert len(rows(db_url)) == 25


def test_rows_flush_on_a_timer_and_when_a_batch_fills(served: Callable[..., Any], db_url: str) -> None:
    server, writer, counted = served(flush_every=0.3, batch_rows=40)
    with httpx.Client() as client:
        for i in range(100):
            assert client.get(server.url + f"/items/{i}").status_code == 200
    deadline = time.monotonic() + 5
    while writer.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.pending == 0
    assert len(rows(db_url)) == 100
    assert 1 <= counted.inserts <= 12, counted.inserts  # batches, not one insert per request


def test_client_disconnect_mid_stream_is_recorded_as_499(served: Callable[..., Any], db_url: str) -> None:
    server, _, _ = served(flush_every=60)
    with httpx.stream("GET", server.url + "/stream") as r:
        for _ in r.iter_raw():
            break  # first chunk, then hang up
    time.sleep(0.3)
    server.stop()
    (row,) = rows(db_url)
    assert row["path"] == "/stream" and row["status"] == 499


async def test_database_outage_keeps_a_bounded_backlog_and_counts_drops() -> None:
    store = Store("postgresql://postgres@127.0.0.1:1/nowhere")
    writer = AccessLogWriter(store, max_buffer=3)
    dropped = telemetry.REGISTRY.get_sample_value("tollway_access_log_dropped_rows_total") or 0.0
    for i in range(5):
        writer.add({"created_at": now_ms(), "request_id": f"req_{i}", "method": "GET", "path": "/healthz",
                    "status": 200, "client_ip": "127.0.0.1", "latency_ms": 1, "tenant_id": None})
    assert writer.pending == 3
    with pytest.raises(ServiceUnavailable):
        await writer.flush()
    assert writer.pending == 3  # kept for the next attempt
    assert telemetry.REGISTRY.get_sample_value("tollway_access_log_dropped_rows_total") == dropped + 2
    await store.close()


@pytest.mark.parametrize("record", [deletion_record_id("tn_gone"), "tn_gone"], ids=["hashed", "legacy"])
async def test_rows_of_deleted_tenants_lose_tenant_and_ip(db_url: str, record: str) -> None:
    store = Store(db_url)
    await store.migrate()
    async with store.write() as conn:
        await conn.execute(deletion_requests.insert().values(tenant_id=record, requested_at=now_ms()))
    writer = AccessLogWriter(store)
    for tenant, ip in (("tn_gone", "203.0.113.7"), ("tn_live", "198.51.100.1")):
        writer.add({"created_at": now_ms(), "request_id": "req_x", "method": "POST", "path": "/v1/chat/completions",
                    "status": 200, "client_ip": ip, "latency_ms": 9, "tenant_id": tenant})
    assert await writer.flush() == 2
    async with store.read() as conn:
        got = (await conn.execute(sa.select(access_log.c.tenant_id, access_log.c.client_ip)
                                  .order_by(access_log.c.id))).all()
    await store.close()
    assert [tuple(g) for g in got] == [(None, None), ("tn_live", "198.51.100.1")]


def test_gateway_logs_admin_routes_by_template(backend: dict[str, Any], make_config: Callable[..., Config],
                                               serve_app: Callable[[Any], ServerThread],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", TOKEN)
    cfg = make_config(**backend)
    server = serve_app(create_app(cfg, provider_keys={}, migrate=True))
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert httpx.get(server.url + "/admin/tenants/tn_missing", headers=auth).status_code == 404
    assert httpx.get(server.url + f"/admin/{SECRET}", headers=auth).status_code == 404
    assert httpx.get(server.url + "/healthz").status_code == 200
    server.stop()
    got = [(g["method"], g["path"], g["status"]) for g in rows(cfg.database.url)]
    assert got == [("GET", "/admin/tenants/{tenant_id}", 404), ("GET", "/admin/*", 404), ("GET", "/healthz", 200)]
