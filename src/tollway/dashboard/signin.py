"""Signing in and out: the sign-in page, one-time links, the OIDC round trip.

A sign-in link opens a page with a button rather than signing in on the GET itself:
mail scanners and chat previews fetch links, and would otherwise use up the one use.
The first OIDC sign-in of a subject creates its tenant, named from the ID token.
"""

from __future__ import annotations

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from tollway.store.schema import tenants
from tollway.telemetry import log

from .oidc import OIDC, Identity, SignInError
from .web import Web


class SignIn:
    def __init__(self, web: Web, oidc: OIDC | None) -> None:
        self.web = web
        self.oidc = oidc

    async def page(self, request: Request) -> Response:
        if await self.web.tenant(request) is not None:
            return RedirectResponse("/dashboard/keys", status_code=303)
        return self.web.render(request, "signin.html", oidc=self.oidc is not None, problem=None)

    async def link_page(self, request: Request) -> Response:
        token = request.path_params["token"]
        valid = self.web.sessions.peek_link(token) is not None
        return self.web.render(request, "link.html", status=200 if valid else 400, valid=valid, token=token)

    async def use_link(self, request: Request) -> Response:
        await self.web.form(request)
        tenant_id = await self.web.sessions.use_link(request.path_params["token"])
        if tenant_id is None or not await self._live(tenant_id):
            return self.web.render(request, "link.html", status=400, valid=False, token="")
        log.info("dashboard_signin", tenant_id=tenant_id, outcome="link")
        response = RedirectResponse("/dashboard/keys", status_code=303)
        self.web.sessions.sign_in(response, tenant_id)
        return response

    async def oidc_start(self, request: Request) -> Response:
        if self.oidc is None:
            return RedirectResponse("/dashboard/signin", status_code=303)
        try:
            url, pending = await self.oidc.start()
        except Exception:
            log.warning("dashboard_oidc_unreachable", outcome="discovery failed")
            return self.web.render(request, "signin.html", status=502, oidc=True,
                                   problem="The identity provider could not be reached. Try again in a moment.")
        redirect = RedirectResponse(url, status_code=303)
        self.web.sessions.save_pending(redirect, pending)
        return redirect

    async def oidc_callback(self, request: Request) -> Response:
        if self.oidc is None:
            return RedirectResponse("/dashboard/signin", status_code=303)
        params = {k: v for k, v in request.query_params.items() if k in ("state", "code", "error")}
        try:
            identity = await self.oidc.finish(params, self.web.sessions.pending(request))
        except SignInError as exc:
            log.warning("dashboard_signin_refused", outcome=str(exc))
            refused = self.web.render(request, "signin.html", status=400, oidc=True, problem=str(exc))
            self.web.sessions.clear_pending(refused)
            return refused
        tenant_id = await self._tenant_for(identity)
        log.info("dashboard_signin", tenant_id=tenant_id, outcome="oidc")
        response = RedirectResponse("/dashboard/keys", status_code=303)
        self.web.sessions.clear_pending(response)
        self.web.sessions.sign_in(response, tenant_id)
        return response

    async def signout(self, request: Request) -> Response:
        await self.web.form(request)
        response = RedirectResponse("/dashboard/signin", status_code=303)
        self.web.sessions.clear(response)
        return response

    async def _live(self, tenant_id: str) -> bool:
        async with self.web.svc.store.read() as conn:
            row = (await conn.execute(sa.select(tenants.c.deleted_at).where(tenants.c.id == tenant_id))).first()
        return row is not None and row.deleted_at is None

    async def _tenant_for(self, identity: Identity) -> str:
        """The tenant of this subject, created at its first sign-in."""
        return await self.web.svc.tenants.for_external_id(identity.subject, identity.name, identity.email)
