"""Sign-in delegated over OpenID Connect: the authorization-code flow with PKCE.

Tollway never sees a password. `start` sends the browser to the issuer with a fresh
`state`, `nonce` and PKCE challenge (S256), kept in a signed cookie for 10 minutes;
`finish` refuses the callback unless its `state` is that one, exchanges the code (with
the verifier and the client secret) at the token endpoint, and accepts the ID token only
if its signature verifies against the issuer's JWKS and its `iss`, `aud` (our client id),
`exp` and `nonce` are right. Any OIDC issuer works by configuration; Clerk is one.
The issuer's metadata and keys are fetched on first use and kept for an hour (the keys
again at once when a token names a key id not among them: a rotation).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx
from authlib.integrations.httpx_client import AsyncOAuth2Client
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from tollway.config import DashboardConfig, resolve_secret

_CACHE_SECONDS = 3600
_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]


class SignInError(Exception):
    """The callback was refused; the message is safe to show."""


@dataclass(frozen=True)
class Identity:
    subject: str        # issuer-qualified: the tenants.external_id of this person
    name: str | None
    email: str | None


class OIDC:
    def __init__(self, cfg: DashboardConfig, source: str, subjects: str = "oidc") -> None:
        """subjects "clerk": the issuer is the Clerk instance that issues the API keys, so a
        person's tenant is the one their keys map to ("clerk:<user id>", auth/clerk.py)."""
        self.cfg = cfg
        self.subjects = subjects
        self.source = source
        self.issuer = cfg.oidc_issuer  # compared exactly, as OIDC Discovery 4.3 requires
        self.redirect_uri = cfg.public_url.rstrip("/") + "/dashboard/oidc/callback"
        self._meta: tuple[float, dict[str, Any]] | None = None
        self._keys: tuple[float, KeySet] | None = None

    def _client(self) -> AsyncOAuth2Client:
        secret = resolve_secret(self.cfg.oidc_client_secret_env, path="dashboard.oidc_client_secret_env",
                                source=self.source).reveal()
        return AsyncOAuth2Client(self.cfg.oidc_client_id, secret, scope=self.cfg.oidc_scopes,
                                 redirect_uri=self.redirect_uri, code_challenge_method="S256", timeout=15)

    async def metadata(self) -> dict[str, Any]:
        if self._meta is None or time.monotonic() - self._meta[0] > _CACHE_SECONDS:
            async with httpx.AsyncClient(timeout=15) as http:
                r = await http.get(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
                r.raise_for_status()
                meta = r.json()
            if not isinstance(meta, dict) or meta.get("issuer") != self.issuer:
                raise SignInError("The identity provider's metadata names another issuer.")
            self._meta = (time.monotonic(), meta)
        return self._meta[1]

    async def _keyset(self, refresh: bool) -> KeySet:
        if refresh or self._keys is None or time.monotonic() - self._keys[0] > _CACHE_SECONDS:
            meta = await self.metadata()
            async with httpx.AsyncClient(timeout=15) as http:
                r = await http.get(str(meta["jwks_uri"]))
                r.raise_for_status()
            self._keys = (time.monotonic(), KeySet.import_key_set(r.json()))
        return self._keys[1]

    async def start(self) -> tuple[str, dict[str, str]]:
        """(the issuer's authorization URL, the pending state to keep in the signed cookie)."""
        meta = await self.metadata()
        pending = {"state": secrets.token_urlsafe(24), "nonce": secrets.token_urlsafe(24),
                   "verifier": secrets.token_urlsafe(48)}
        async with self._client() as client:
            url, _ = client.create_authorization_url(str(meta["authorization_endpoint"]), state=pending["state"],
                                                     code_verifier=pending["verifier"], nonce=pending["nonce"])
        return url, pending

    async def finish(self, params: dict[str, str], pending: dict[str, str] | None) -> Identity:
        if pending is None:
            raise SignInError("The sign-in took too long or began in another browser. Please sign in again.")
        if not secrets.compare_digest(params.get("state", ""), pending.get("state", "")):
            raise SignInError("The sign-in response does not match the sign-in this browser started.")
        if "error" in params:
            raise SignInError("The identity provider did not sign you in.")
        code = params.get("code")
        if not code:
            raise SignInError("The identity provider sent no authorization code.")
        meta = await self.metadata()
        try:
            async with self._client() as client:
                token = await client.fetch_token(str(meta["token_endpoint"]), code=code,
                                                 code_verifier=pending["verifier"], grant_type="authorization_code")
        except Exception as exc:  # the provider's answer may quote what we sent: say only what failed
            raise SignInError("The identity provider refused the authorization code.") from exc
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise SignInError("The identity provider sent no ID token.")
        claims = await self.verify(id_token, pending["nonce"])
        qualifier = hashlib.sha256(self.issuer.encode()).hexdigest()[:10]
        name, email = claims.get("name"), claims.get("email")
        subject = f"clerk:{claims['sub']}" if self.subjects == "clerk" else f"oidc:{qualifier}:{claims['sub']}"
        return Identity(subject[:200], name if isinstance(name, str) else None,
                        email if isinstance(email, str) else None)

    async def verify(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims, if signed by the issuer's key and meant for us, now, for this sign-in."""
        for refresh in (False, True):
            try:
                decoded = jwt.decode(id_token, await self._keyset(refresh), algorithms=_ALGORITHMS)
                break
            except JoseError as exc:
                if refresh:
                    raise SignInError("The ID token's signature does not verify with the issuer's keys.") from exc
        registry = jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": self.issuer}, aud={"essential": True, "value": self.cfg.oidc_client_id},
            sub={"essential": True}, exp={"essential": True}, nonce={"essential": True, "value": nonce})
        try:
            registry.validate(decoded.claims)
        except JoseError as exc:
            raise SignInError("The ID token is not for this sign-in (issuer, audience, expiry or nonce).") from exc
        return dict(decoded.claims)
