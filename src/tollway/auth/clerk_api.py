"""Clerk's Backend API, the four calls Tollway makes: verify, create, list and revoke an API key.

Plain REST over one pooled httpx.AsyncClient per process (docs/design.md says why not the
`clerk-backend-api` SDK): POST /v1/api_keys/verify {"secret"}, POST /v1/api_keys
{"type": "api_key", "name", "subject", "seconds_until_expiration"}, GET /v1/api_keys
?subject=&type=api_key&include_invalid=true, POST /v1/api_keys/{id}/revoke
{"revocation_reason"}; every call carries `Authorization: Bearer <Clerk secret key>`.

What a status means (the failure policy, docs/keys.md): only 400 and 404 say the
customer's key (or key id) is bad. 401/403 (our secret is wrong), 429, 5xx, a timeout, a
network error or an answer that is not what Clerk documents are our problem: they raise
`ClerkUnavailable` (503) and are logged with the status and the error's type, never the
key, the secret or Clerk's message (which may quote what we sent).
"""

from __future__ import annotations

import math
import re
from typing import Any

import httpx

from tollway.config import AuthConfig, resolve_secret
from tollway.errors import ServiceUnavailable

# Clerk's documented shapes (its OpenAPI spec): a key id, a subject.
KEY_ID = re.compile(r"(ak|api_key)_[0-9A-Fa-f]{32}")
SUBJECT = re.compile(r"(user|org|mch)_\w{1,64}")
_LIST_PAGE = 100
_LIST_PAGES = 20  # 2,000 keys per subject at most: a dashboard page, not an export


class ClerkUnavailable(ServiceUnavailable):
    code = "key_issuer_unavailable"

    def __init__(self, message: str = "API keys cannot be verified right now (the gateway's key issuer did not "
                                      "answer); retry shortly.") -> None:
        super().__init__(message)


class ClerkAPI:
    """One process's client. The secret is read from the environment when the first call is
    made, so commands that never call Clerk (migrate, ledger verify) do not need it."""

    def __init__(self, cfg: AuthConfig, source: str) -> None:
        self.cfg = cfg
        self.source = source
        self._http: httpx.AsyncClient | None = None

    def secret_env_check(self) -> None:
        """ConfigError naming the env var when the Clerk secret key is unset (checked at start-up)."""
        resolve_secret(self.cfg.clerk_secret_key_env, path="auth.clerk_secret_key_env", source=self.source)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            secret = resolve_secret(self.cfg.clerk_secret_key_env, path="auth.clerk_secret_key_env",
                                    source=self.source).reveal()
            self._http = httpx.AsyncClient(
                base_url=self.cfg.clerk_api_url.rstrip("/") + "/v1",
                headers={"authorization": f"Bearer {secret}", "accept": "application/json"},
                timeout=httpx.Timeout(self.cfg.clerk_timeout_seconds),
                # A burst of distinct unknown keys waits for a connection rather than opening
                # hundreds against Clerk's rate limit (auth/clerk.py bounds the burst too).
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
                follow_redirects=False, trust_env=False)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _call(self, operation: str, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        """(status, parsed JSON) for 2xx, 400 and 404; ClerkUnavailable for anything else."""
        from tollway.telemetry import log

        try:
            r = await self._client().request(method, path, **kw)
        except httpx.HTTPError as exc:
            log.warning("clerk_api_failed", clerk_operation=operation, exc_type=type(exc).__name__)
            raise ClerkUnavailable() from None
        if r.status_code in (400, 404):
            return r.status_code, None
        if not 200 <= r.status_code < 300:
            # 401/403: our Clerk secret key is wrong; 429: Clerk's rate limit; 5xx: Clerk is down.
            log.warning("clerk_api_failed", clerk_operation=operation, upstream_status=r.status_code)
            raise ClerkUnavailable()
        try:
            return r.status_code, r.json()
        except ValueError:
            log.warning("clerk_api_failed", clerk_operation=operation, upstream_status=r.status_code,
                        exc_type="unparsable_answer")
            raise ClerkUnavailable() from None

    async def verify(self, secret: str) -> dict[str, Any] | None:
        """Clerk's API key object for `secret`; None when Clerk says the key is bad (400/404)."""
        _, body = await self._call("verify", "POST", "/api_keys/verify", json={"secret": secret})
        if body is None:
            return None
        return api_key(body, "verify")

    async def create(self, subject: str, name: str, expires_at_ms: int | None, now_ms: int) -> dict[str, Any]:
        payload: dict[str, Any] = {"type": "api_key", "name": name, "subject": subject}
        if expires_at_ms is not None:
            payload["seconds_until_expiration"] = max(1, math.ceil((expires_at_ms - now_ms) / 1000))
        status, body = await self._call("create", "POST", "/api_keys", json=payload)
        if body is None:
            raise ClerkUnavailable(f"Clerk refused to create the key (HTTP {status}).")
        key = api_key(body, "create")
        if not isinstance(body.get("secret"), str) or not body["secret"].startswith("ak_"):
            raise _unexpected("create")
        return {**key, "secret": body["secret"]}

    async def list(self, subject: str) -> list[dict[str, Any]]:
        """Every API key of `subject`, revoked and expired ones too (404: none)."""
        out: list[dict[str, Any]] = []
        for page in range(_LIST_PAGES):
            _, body = await self._call("list", "GET", "/api_keys", params={
                "subject": subject, "type": "api_key", "include_invalid": "true", "limit": _LIST_PAGE,
                "offset": page * _LIST_PAGE})
            if body is None:
                return out
            data = body.get("data") if isinstance(body, dict) else None
            if not isinstance(data, list):
                raise _unexpected("list")
            out += [api_key(item, "list") for item in data]
            if len(data) < _LIST_PAGE:
                break
        return out

    async def revoke(self, key_id: str, reason: str) -> bool:
        """True once Clerk has the key revoked; False when Clerk knows no such key (404/400)."""
        if not KEY_ID.fullmatch(key_id):
            return False
        _, body = await self._call("revoke", "POST", f"/api_keys/{key_id}/revoke",
                                   json={"revocation_reason": reason})
        return body is not None


def api_key(body: Any, operation: str) -> dict[str, Any]:
    """Clerk's API key object, checked for the fields Tollway relies on."""
    if not isinstance(body, dict):
        raise _unexpected(operation)
    key_id, subject = body.get("id"), body.get("subject")
    if not (isinstance(key_id, str) and KEY_ID.fullmatch(key_id) and isinstance(subject, str)
            and SUBJECT.fullmatch(subject)):
        raise _unexpected(operation)
    expiration = body.get("expiration")
    return {"id": key_id, "subject": subject, "name": str(body.get("name") or "")[:200] or None,
            "revoked": body.get("revoked") is True, "expired": body.get("expired") is True,
            "expiration": int(expiration) if isinstance(expiration, int | float) and expiration > 0 else None,
            "created_at": _ms(body.get("created_at")), "updated_at": _ms(body.get("updated_at")),
            "last_used_at": _ms(body.get("last_used_at"))}


def _ms(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None


def _unexpected(operation: str) -> ClerkUnavailable:
    from tollway.telemetry import log

    log.warning("clerk_api_failed", clerk_operation=operation, exc_type="unexpected_answer")
    return ClerkUnavailable()
