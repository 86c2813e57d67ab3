"""Dashboard sessions, CSRF tokens, one-time sign-in links and the page-security headers.

A session is a cookie signed with the session secret (itsdangerous, HMAC-SHA1 over a
derived key; timestamped so it expires): {"t": tenant id or None, "c": CSRF token}. The
tenant a page acts for comes from here and nowhere else. The cookie is Secure, HttpOnly,
SameSite=Lax and scoped to /dashboard. Every visitor, signed in or not, has a CSRF token,
so the sign-in forms carry one too; every POST compares the form's token with the
session's in constant time before anything else runs (403, nothing changed).

A sign-in link (`tollway dashboard-link`) is a token signed with the same secret under
another salt, holding the tenant id and a random nonce; it expires after 15 minutes and
works once: using it inserts the nonce into `dashboard_link_uses`, whose primary key
refuses a second use on every worker.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tollway.auth.key_secret import load_secret
from tollway.config import DashboardConfig
from tollway.store.db import Store, now_ms
from tollway.store.schema import dashboard_link_uses

COOKIE = "tollway_session"
COOKIE_PATH = "/dashboard"
LINK_MAX_AGE = 15 * 60
_SESSION_SALT = "tollway-dashboard-session"
_LINK_SALT = "tollway-dashboard-link"
_OIDC_SALT = "tollway-dashboard-oidc"
OIDC_COOKIE = "tollway_oidc"
OIDC_MAX_AGE = 10 * 60

# Every dashboard response, the public pages too. No inline script or style anywhere:
# the only script is static/dashboard.js. form-action lets the top-up form's redirect
# reach Stripe Checkout (Chromium checks form-action on redirects too).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "form-action 'self' https://checkout.stripe.com; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # sign-in link tokens live in URLs
    (b"x-frame-options", b"DENY"),
)


MAX_FORM_BYTES = 64 * 1024  # the largest dashboard form is a few hundred bytes


class SecureHeaders:
    """Adds SECURITY_HEADERS (and no-store on pages) to every response of `app`, and
    refuses a request body it would have to hold in memory past MAX_FORM_BYTES."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = "/static/" in scope["path"]
        if scope["method"] == "POST":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if not length.isdigit() or int(length) > MAX_FORM_BYTES:
                # Browsers send forms with a length; without one the form parser would read on.
                refused = PlainTextResponse("Length required." if not length else "Form too large.",
                                            status_code=411 if not length else 413,
                                            headers={k.decode(): v.decode() for k, v in SECURITY_HEADERS})
                await refused(scope, receive, send)
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in _OURS]
                headers += SECURITY_HEADERS
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


_OURS = frozenset(k for k, _ in SECURITY_HEADERS)


@dataclass(frozen=True)
class Session:
    tenant_id: str | None
    csrf: str


class Sessions:
    def __init__(self, cfg: DashboardConfig, secret: bytes, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self._session = URLSafeTimedSerializer(secret, salt=_SESSION_SALT)
        self._links = URLSafeTimedSerializer(secret, salt=_LINK_SALT)
        self._oidc = URLSafeTimedSerializer(secret, salt=_OIDC_SALT)

    @classmethod
    def from_config(cls, cfg: DashboardConfig, sqlite_file: Path | None, store: Store) -> tuple[Sessions, str | None]:
        secret, notice = load_secret(cfg.session_secret_env, sqlite_file, ".tollway-session-secret",
                                     "dashboard session secret")
        return cls(cfg, secret, store), notice

    # --- the session cookie ----------------------------------------------------------------

    def read(self, request: Request) -> Session | None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data = self._session.loads(raw, max_age=self.cfg.session_max_age_seconds)
        except BadSignature:  # forged, altered or expired (SignatureExpired is a BadSignature)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("c"), str):
            return None
        tenant = data.get("t")
        return Session(tenant if isinstance(tenant, str) else None, data["c"])

    def current(self, request: Request) -> Session:
        """This request's session, a new anonymous one when it has none (set by `save`)."""
        cached = request.scope.get("tollway_session")
        if isinstance(cached, Session):
            return cached
        session = self.read(request) or Session(None, secrets.token_urlsafe(24))
        request.scope["tollway_session"] = session
        return session

    def save(self, response: Response, session: Session) -> None:
        response.set_cookie(COOKIE, self._session.dumps({"t": session.tenant_id, "c": session.csrf}),
                            max_age=self.cfg.session_max_age_seconds, path=COOKIE_PATH, secure=True,
                            httponly=True, samesite="lax")

    def sign_in(self, response: Response, tenant_id: str) -> None:
        # A fresh CSRF token at every sign-in: one planted before it is worth nothing after.
        self.save(response, Session(tenant_id, secrets.token_urlsafe(24)))

    def clear(self, response: Response) -> None:
        response.delete_cookie(COOKIE, path=COOKIE_PATH, secure=True, httponly=True, samesite="lax")

    def csrf_ok(self, request: Request, form: Any) -> bool:
        session = self.read(request)
        sent = form.get("csrf")
        return (session is not None and isinstance(sent, str)
                and hmac.compare_digest(sent.encode(), session.csrf.encode()))

    # --- one-time sign-in links -----------------------------------------------------------------

    def link(self, tenant_id: str) -> str:
        token = self._links.dumps({"t": tenant_id, "n": secrets.token_urlsafe(18)})
        return f"{self.cfg.public_url.rstrip('/')}/dashboard/link/{token}"

    def peek_link(self, token: str) -> str | None:
        """The tenant a link signs in, if it is genuine and younger than 15 minutes."""
        data = self._load_link(token)
        return data[0] if data else None

    async def use_link(self, token: str) -> str | None:
        """The link's tenant, once: None when forged, expired or already used."""
        data = self._load_link(token)
        if data is None:
            return None
        tenant_id, nonce = data
        try:
            async with self.store.write() as conn:
                await conn.execute(dashboard_link_uses.insert().values(nonce=nonce, used_at=now_ms()))
        except sa.exc.IntegrityError:
            return None
        return tenant_id

    def _load_link(self, token: str) -> tuple[str, str] | None:
        try:
            data = self._links.loads(token, max_age=LINK_MAX_AGE)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("t"), str) or not isinstance(data.get("n"), str):
            return None
        return data["t"], data["n"]

    # --- the OIDC round trip's state (state, nonce, PKCE verifier) -------------------------------

    def save_pending(self, response: Response, pending: dict[str, str]) -> None:
        response.set_cookie(OIDC_COOKIE, self._oidc.dumps(pending), max_age=OIDC_MAX_AGE, path=COOKIE_PATH,
                            secure=True, httponly=True, samesite="lax")

    def pending(self, request: Request) -> dict[str, str] | None:
        raw = request.cookies.get(OIDC_COOKIE)
        if not raw:
            return None
        try:
            data = self._oidc.loads(raw, max_age=OIDC_MAX_AGE)
        except BadSignature:
            return None
        return data if isinstance(data, dict) else None

    def clear_pending(self, response: Response) -> None:
        response.delete_cookie(OIDC_COOKIE, path=COOKIE_PATH, secure=True, httponly=True, samesite="lax")
