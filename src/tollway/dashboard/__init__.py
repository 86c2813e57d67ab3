"""The customer dashboard under /dashboard, the public /security page and
/.well-known/security.txt: a control plane served by the gateway's own process.

Customers sign in (OIDC or a one-time link), manage their keys, top up through Stripe
Checkout, read their usage and ledger, export or delete their data. Every handler is thin
over the same service objects as the CLI and the admin API; none takes a lock or a
transaction the /v1 path waits on (reads, and the same short writes as the CLI).

Modules in reading order:
  sessions.py  signed session cookie, CSRF tokens, one-time sign-in links, the headers
               (CSP, nosniff, Referrer-Policy) every response carries
  oidc.py      OpenID Connect sign-in (Authlib; PKCE, state, nonce, ID token via JWKS)
  web.py       templates, the signed-in tenant (from the session only), CSRF-checked
               forms, error pages
  signin.py    sign-in page, sign-in links, the OIDC round trip, sign-out
  pages.py     keys (with their own rate limits), wallet (Stripe top-up, ledger history),
               privacy (export, delete)
  rollup.py    daily usage totals of finished days, folded in the background
  usage.py     usage per day and model, SVG chart, CSV, recent requests
  security.py  /security and security.txt, generated from the config and privacy.py
  templates/   Jinja2: one base layout; static/: one stylesheet and one small script
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from tollway.config import Config, DashboardConfig
from tollway.errors import TollwayError
from tollway.services import Services

from .oidc import OIDC
from .pages import Pages
from .rollup import Rollup
from .security import SecurityPage
from .sessions import SecureHeaders, Sessions
from .signin import SignIn
from .usage import Usage
from .web import HERE, Web


def rollup(svc: Services) -> Rollup:
    return Rollup(svc.store, svc.config.server.request_timeout_seconds * 1000 + 60_000)


async def background(svc: Services) -> None:
    """What a serving process runs beside the pages: folding finished days' usage (rollup.py)."""
    if svc.config.dashboard is not None:
        await rollup(svc).run()


def dashboard_routes(svc: Services) -> list[BaseRoute]:
    """/security always; /.well-known/security.txt with a [security] table; /dashboard
    with a [dashboard] table."""
    cfg = svc.config
    if cfg.dashboard is not None:
        sessions, notice = Sessions.from_config(cfg.dashboard, svc.store.sqlite_file, svc.store)
        if notice:
            svc.notices.append(notice)
    else:  # /security alone renders with the layout; no one can sign in
        sessions = Sessions(DashboardConfig(), secrets.token_bytes(32), svc.store)
    web = Web(svc, sessions)
    security = SecurityPage(web, cfg)
    errors: dict[Any, Any] = {HTTPException: web.error, TollwayError: web.error}
    routes: list[BaseRoute] = [Route("/security", SecureHeaders(_page(security.page, errors)), methods=["GET"])]
    if cfg.security is not None:
        routes.append(Route("/.well-known/security.txt", SecureHeaders(_page(security.txt, errors)),
                            methods=["GET"]))
    if cfg.dashboard is not None:
        inner = Starlette(routes=_pages(web, cfg.dashboard, rollup(svc)), exception_handlers=errors)
        routes.append(Mount("/dashboard", app=SecureHeaders(inner)))
    return routes


def sign_in_config(cfg: Config) -> DashboardConfig:
    """The dashboard's table, with Clerk's Frontend API as the OIDC issuer when keys are
    Clerk's (auth.clerk_frontend_api_url) and no other issuer is set."""
    assert cfg.dashboard is not None
    if cfg.auth.clerk and not cfg.dashboard.oidc_issuer and cfg.auth.clerk_frontend_api_url:
        return dataclasses.replace(cfg.dashboard, oidc_issuer=cfg.auth.clerk_frontend_api_url)
    return cfg.dashboard


def _page(handler: Callable[[Request], Awaitable[Response]], errors: dict[Any, Any]) -> Starlette:
    return Starlette(routes=[Route("/{_:path}", handler, methods=["GET"])], exception_handlers=errors)


def _pages(web: Web, cfg: DashboardConfig, totals: Rollup) -> list[BaseRoute]:
    cfg = sign_in_config(web.svc.config)
    subjects = "clerk" if web.svc.config.auth.clerk else "oidc"
    signin = SignIn(web, OIDC(cfg, web.svc.config.source, subjects) if cfg.oidc_issuer else None)
    pages, usage, on = Pages(web, totals), Usage(web, totals), web.signed_in

    async def home(_: Request) -> Response:
        return RedirectResponse("/dashboard/keys", status_code=303)

    return [
        Route("/", home, methods=["GET"]),
        Route("/signin", signin.page, methods=["GET"]),
        Route("/signin/oidc", signin.oidc_start, methods=["GET"]),
        Route("/oidc/callback", signin.oidc_callback, methods=["GET"]),
        Route("/link/{token}", signin.link_page, methods=["GET"]),
        Route("/link/{token}", signin.use_link, methods=["POST"]),
        Route("/signout", signin.signout, methods=["POST"]),
        Route("/keys", on(pages.keys), methods=["GET"]),
        Route("/keys", on(pages.create_key), methods=["POST"]),
        Route("/keys/revoke", on(pages.revoke_key), methods=["POST"]),
        Route("/keys/limits", on(pages.set_key_limits), methods=["POST"]),
        Route("/keys/{key_id}", on(pages.key), methods=["GET"]),
        Route("/keys/{key_id}/limits", on(pages.key_limits), methods=["GET"]),
        Route("/wallet", on(pages.wallet), methods=["GET"]),
        Route("/wallet/topup", on(pages.topup), methods=["POST"]),
        Route("/wallet/entries/{entry_id:path}", on(pages.entry), methods=["GET"]),
        Route("/usage", on(usage.page), methods=["GET"]),
        Route("/usage.csv", on(usage.csv), methods=["GET"]),
        Route("/usage/requests/{request_id}", on(usage.request), methods=["GET"]),
        Route("/privacy", on(pages.privacy), methods=["GET"]),
        Route("/privacy/export", on(pages.export), methods=["GET"]),
        Route("/privacy/delete", on(pages.delete), methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=HERE / "static")),
    ]
