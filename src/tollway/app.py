"""The ASGI application: routes, middleware, lifespan.

What it answers is listed in route_table.py (ROUTE_TABLE); a test checks the app serves
exactly that list.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from tollway import config as config_mod
from tollway import retention, telemetry
from tollway.accesslog import AccessLogWriter
from tollway.bodycap import ControlBodyCap
from tollway.config import Config
from tollway.edge import Edge
from tollway.errors import TollwayError, Unauthorized, render_json
from tollway.ledger.holds import DatabaseInUse, ServingLock
from tollway.route_table import ROUTE_TABLE as ROUTE_TABLE
from tollway.services import Services, build

# (path, methods, who may call it, what it does)


async def healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    services: Services = request.app.state.services
    try:
        current = await services.store.migrations_current()
    except TollwayError as exc:
        return JSONResponse({"status": "unavailable", "reason": exc.message}, status_code=503)
    if not current:
        return JSONResponse({"status": "unavailable", "reason": "database migrations are not current; run "
                             "`tollway migrate`"}, status_code=503)
    return JSONResponse({"status": "ready"})


async def _tollway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TollwayError)
    return render_json(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    from tollway.admin import http_refusal

    assert isinstance(exc, HTTPException)
    return http_refusal(exc, request.url.path)


# A request leaves nothing behind for the cycle collector, but up to a few hundred
# container objects are alive while it runs; with many requests in flight, CPython's
# default first threshold (700) ran a collection every ~15 requests (see serve_gc).
GC_THRESHOLDS = (10_000, 10, 10)


def serve_gc() -> None:
    """Tune the cycle collector for a serving process, once it has started up.

    Measured in the bench (32 connections, streamed requests, docs/performance-history.md): with
    CPython's defaults the collector took ~63 us of each request's ~0.7 ms of CPU, and
    each full collection walked the ~130k objects that start-up leaves (imports, the
    schema, compiled statements), pausing the loop ~70 ms every ~1,700 requests (the
    p99). `gc.freeze()` moves those objects out of the collector's sight for good (they
    live as long as the process); the higher first threshold makes young collections
    rare. Garbage without cycles is still freed at once by reference counting."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _metrics_endpoint(cfg: Config) -> Callable[[Request], Awaitable[Response]]:
    if not cfg.metrics.require_admin_token:
        return telemetry.metrics_endpoint
    from tollway.admin import operator_token_ok

    async def metrics_for_the_operator(request: Request) -> Response:
        token = os.environ.get(cfg.server.admin_token_env, "")
        if not operator_token_ok(request.headers.get("authorization", ""), token):
            return render_json(Unauthorized("/metrics needs the admin token (metrics.require_admin_token)."))
        return await telemetry.metrics_endpoint(request)

    return metrics_for_the_operator


def create_app(cfg: Config, *, services: Services | None = None, migrate: bool | None = None,
               provider_keys: dict[str, Any] | None = None, tune_gc: bool = False,
               sole_server: bool = True) -> Starlette:
    """Build the gateway. `services` and `provider_keys` may be injected by tests;
    `tune_gc` (the serving process) applies `serve_gc` once started. `sole_server`
    False: other processes serve from the same database (`serve --workers N`); on SQLite
    True keeps holds in memory and refuses to start beside another server (ledger/holds.py)."""
    worker_id = "wk_" + secrets.token_hex(6)
    svc = services or build(cfg, worker_id=worker_id, sole_server=sole_server)
    if svc.workers.worker_id is None:
        svc.workers.worker_id = worker_id
    keys = provider_keys if provider_keys is not None else config_mod.provider_secrets(cfg)
    do_migrate = svc.store.is_sqlite if migrate is None else migrate

    from tollway.admin import admin_mount
    from tollway.proxy.routes import Proxy

    proxy = Proxy(svc, keys)
    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        *proxy.routes(),
        admin_mount(svc),
    ]
    if svc.payments is not None:  # /webhooks/stripe exists only with a [stripe] table
        from tollway.webhooks.stripe import stripe_routes

        routes += stripe_routes(svc.payments)
    if cfg.auth.clerk:  # /webhooks/clerk exists only with Clerk-issued keys
        from tollway.webhooks.clerk import clerk_routes

        routes += clerk_routes(svc)
    from tollway import dashboard

    routes += dashboard.dashboard_routes(svc)
    if cfg.metrics.enabled:
        routes.append(Route("/metrics", _metrics_endpoint(cfg), methods=["GET"]))
    telemetry.configure_logging()
    telemetry.configure_metrics([m.id for m in cfg.models], cfg.providers, cfg.metrics.tenant_labels)
    access = AccessLogWriter(svc.store)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Held from before the first query to after the last (ledger/holds.py says why).
        with contextlib.ExitStack() as held:
            if svc.store.sqlite_file is not None:
                try:
                    held.enter_context(ServingLock(svc.store.sqlite_file, exclusive=svc.ledger.holds is not None))
                except DatabaseInUse:
                    await svc.close()
                    raise
            async with running():
                yield

    @contextlib.asynccontextmanager
    async def running() -> AsyncIterator[None]:
        if do_migrate:
            await svc.store.migrate()
        elif not await svc.store.migrations_current():
            await svc.close()
            raise RuntimeError("database migrations are not current; run `tollway migrate` first")
        # Charges a predecessor journaled but did not apply go into the ledger first (ledger/journal.py).
        recovered = await svc.ledger.recover_charges()
        if recovered:
            telemetry.log.info("charge_journal_recovered", count=recovered)
        # Registers, then releases what a killed predecessor left reserved, before serving.
        await svc.workers.start(svc.ledger, cfg.server.max_request_ms)
        await proxy.start()
        access.start()
        tasks = [
            asyncio.create_task(retention.run_periodic_purge(svc.store, cfg.retention.access_log_days)),
            asyncio.create_task(svc.workers.run(svc.ledger, cfg.server.max_request_ms)),
            asyncio.create_task(svc.keys.run_last_used_flusher()),
            asyncio.create_task(dashboard.background(svc)),
        ]
        if tune_gc:
            serve_gc()
        try:
            yield
        finally:
            await _until_settled(svc.ledger.live)
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            with contextlib.suppress(Exception):
                await svc.keys.flush_last_used()
            await proxy.close()
            await access.close()  # after the last request: its row is written too
            await svc.workers.unregister()
            await svc.close()

    app = _Gateway(lambda inner: Edge(inner, access, proxy.shortcuts()),
                   routes=routes, lifespan=lifespan,
                   exception_handlers={TollwayError: _tollway_error, HTTPException: _http_error})
    app.state.services = svc
    app.state.config = cfg
    return app


async def _until_settled(live: set[str], within: float = 35.0) -> None:
    """Requests cancelled at the drain's deadline still settle (relay.py, pipeline.py), in
    their own time: the database stays open until they have, for up to `within` (a settle
    rides out a database restart for 30 s, pipeline.SETTLE_RETRY_SECONDS)."""
    for _ in range(int(within / 0.02)):
        if not live:
            return
        await asyncio.sleep(0.02)


class _Gateway(Starlette):
    """Starlette with the edge (edge.py) outside its own error middleware, so that
    the /v1 POST endpoints can be reached without passing through it. Every other
    request passes the body cap (bodycap.py) first."""

    def __init__(self, edge: Callable[[ASGIApp], ASGIApp], **kwargs: Any) -> None:
        self.edge = edge  # before Starlette's __init__, which may build the stack
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        return self.edge(ControlBodyCap(super().build_middleware_stack()))


def app_from_env() -> Starlette:
    """uvicorn factory for `tollway serve` (each worker process builds its own app)."""
    cfg = config_mod.load(config_mod.find_config_path(os.environ.get(config_mod.CONFIG_ENV)))
    return create_app(cfg, migrate=False, tune_gc=True, sole_server=os.environ.get(config_mod.WORKERS_ENV, "1") == "1")
