"""What every page shares: the templates, the signed-in tenant, CSRF-checked forms, errors.

Authorisation is decided here, once: `tenant(request)` is the session's tenant (never a
form field or URL), and a page about an object looks it up with that tenant in the
WHERE clause, so another tenant's id is simply not found (404, the same as no such id).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from tollway.errors import NotFound, TollwayError
from tollway.money import MICROS_PER_USD, format_usd
from tollway.services import Services

from .sessions import Session, Sessions

HERE = Path(__file__).parent
MAX_FORM_FIELDS = 20
Handler = Callable[[Request], Awaitable[Response]]


def cents(micros: int | None) -> str:
    """$1,234.57: rounded to the cent for reading (the exact value goes in a tooltip), except
    that an amount below a cent is shown exactly ("$0.000026"), never as a misleading $0.00."""
    value = int(micros or 0)
    sign = "-" if value < 0 else ""
    if 0 < abs(value) < 5_000:
        return f"{sign}${format_usd(abs(value)).rstrip('0')}"
    whole_cents = (abs(value) + 5_000) // 10_000
    return f"{sign}${whole_cents // 100:,}.{whole_cents % 100:02d}"


def when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC") if ms else "—"


def ago(ms: int | None) -> str:
    """A relative hint next to a UTC time: "3 min ago", "2 days ago"."""
    if not ms:
        return ""
    seconds = max(0, int(datetime.now(UTC).timestamp() - ms / 1000))
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "min")):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n > 1 and unit != 'min' else ''} ago"
    return "just now"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    env.filters.update(cents=cents, exact=format_usd, when=when, ago=ago, thousands=lambda n: f"{int(n or 0):,}")
    env.globals["micros_per_usd"] = MICROS_PER_USD
    return env


class Web:
    def __init__(self, svc: Services, sessions: Sessions) -> None:
        self.svc = svc
        self.sessions = sessions
        self.templates = _env()
        self.oidc_on = bool(svc.config.dashboard and svc.config.dashboard.oidc_issuer)

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        session = self.sessions.current(request)
        html = self.templates.get_template(template).render(
            request=request, csrf=session.csrf, signed_in=session.tenant_id is not None,
            path=request.url.path, **context)
        response = HTMLResponse(html, status_code=status)
        if request.url.path.startswith("/dashboard") and self.sessions.read(request) is None:
            self.sessions.save(response, session)  # a new visitor's session: it holds the CSRF token
        return response

    async def tenant(self, request: Request) -> dict[str, Any] | None:
        """The signed-in tenant, or None (no session, or its tenant was deleted)."""
        session = self.sessions.current(request)
        if session.tenant_id is None:
            return None
        try:
            tenant = await self.svc.tenants.get(session.tenant_id)
        except NotFound:
            request.scope["tollway_session"] = Session(None, session.csrf)
            return None
        request.scope.setdefault("state", {})["tenant_id"] = tenant["id"]  # the access log's tenant column
        return tenant

    async def form(self, request: Request) -> FormData:
        """The POSTed form after its CSRF check: 403 (and nothing done) without a valid token."""
        form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS)
        if not self.sessions.csrf_ok(request, form):
            raise HTTPException(403, "This form has expired or did not come from this site. Reload the page "
                                     "and try again.")
        return form

    def signed_in(self, handler: Callable[[Request, dict[str, Any]], Awaitable[Response]]) -> Handler:
        """A page for signed-in tenants; others are sent to the sign-in page."""
        async def page(request: Request) -> Response:
            if request.method == "POST":
                await self.form(request)  # the CSRF check comes first, signed in or not
            tenant = await self.tenant(request)
            if tenant is None:
                if request.method == "POST":
                    raise HTTPException(403, "Your session has ended. Sign in again.")
                return RedirectResponse("/dashboard/signin", status_code=303)
            return await handler(request, tenant)
        return page

    async def error(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            status, message = exc.status_code, exc.detail
        elif isinstance(exc, TollwayError):
            status, message = exc.status, exc.message
        else:  # pragma: no cover - Starlette only routes the two above here
            raise exc
        if status == 404:
            message = "There is nothing here. It may have been removed, or the address is wrong."
        return self.render(request, "error.html", status=status, status_code=status, message=message)
