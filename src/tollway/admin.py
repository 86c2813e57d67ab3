"""The operator API under /admin: the same operations as the CLI, over the same objects.

Authenticated by a bearer token from the env var named by server.admin_token_env; when
that variable is unset the API answers 404 to everything, including its OpenAPI file.
The token is checked by an ASGI gate in front of FastAPI, which would otherwise read and
parse the whole body before any dependency ran; the body itself is capped by bodycap.py.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tollway.bodycap import refuse
from tollway.errors import BadRequest, NotFound, TollwayError, Unauthorized, render_json
from tollway.money import MoneyError, format_usd, parse_operator_usd
from tollway.services import Services


class TenantIn(BaseModel):
    name: str | None = Field(default=None, max_length=200)
    email: str | None = Field(default=None, max_length=320)


class KeyIn(BaseModel):
    name: str | None = Field(default=None, max_length=200)
    expires_at: int | None = Field(default=None, ge=0, le=2**53, description="unix epoch milliseconds")
    spend_limit_usd: str | None = Field(default=None, description='decimal string, e.g. "10.00"')
    spend_limit_period: str | None = Field(default=None, pattern="^(day|month)$")


class CreditIn(BaseModel):
    amount_usd: str = Field(description='decimal string, e.g. "5.00"')
    reference: str = Field(min_length=1, max_length=200, description="idempotency reference, at most 80 characters")


class TopupIn(BaseModel):
    amount_usd: str = Field(description='decimal string, e.g. "20.00", within [stripe] min/max')
    idempotency_key: str | None = Field(default=None, max_length=80, description="same key, same session")


def usd(text: str, what: str) -> int:
    try:
        return parse_operator_usd(text)
    except MoneyError as exc:
        raise BadRequest(f"{what}: {exc}", param=what) from None


def operator_token_ok(authorization: str, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time; never true for an unset token."""
    scheme, _, value = authorization.partition(" ")
    # Digests of equal length: the comparison says nothing about the token's length either.
    given, wanted = hashlib.sha256(value.encode()).digest(), hashlib.sha256(token.encode()).digest()
    return bool(token) and hmac.compare_digest(given, wanted) and scheme.lower() == "bearer"


class TokenGate:
    """The admin token, checked on the request head before the body is touched."""

    def __init__(self, app: ASGIApp, token_env: str) -> None:
        self.app = app
        self.token_env = token_env

    def refusal(self, authorization: str) -> TollwayError | None:
        token = os.environ.get(self.token_env, "")
        if not token:
            return NotFound("the admin API is off (set the admin token environment variable)")
        if not operator_token_ok(authorization, token):
            return Unauthorized("Invalid admin token.")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def no_store(message: Message) -> None:
            # Key creation answers with the key itself and an export with personal data: no
            # answer of the operator API, a refusal included, is for a cache to keep.
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"]
                message = {**message, "headers": [*headers, (b"cache-control", b"no-store")]}
            await send(message)

        refused = self.refusal(Headers(scope=scope).get("authorization", ""))
        if refused is not None:
            await refuse(refused, scope, receive, no_store)
            return
        await self.app(scope, receive, no_store)


def admin_app(svc: Services) -> TokenGate:
    api = FastAPI(title="Tollway admin API", version="1", openapi_url=None, docs_url=None, redoc_url=None)

    @api.exception_handler(TollwayError)
    async def _err(_: Request, exc: TollwayError) -> Any:
        return render_json(exc)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Any:
        # FastAPI's own 422 is not OpenAI-style and quotes the input back; name the field only.
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = ".".join(where) or None
        reason = str(first.get("msg", "invalid request body"))
        return render_json(BadRequest(f"{field}: {reason}" if field else reason, param=field))

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(api.openapi())

    @api.post("/tenants")
    async def create_tenant(body: TenantIn) -> dict[str, Any]:
        return await svc.tenants.create(body.name, body.email)

    @api.get("/tenants/{tenant_id}")
    async def get_tenant(tenant_id: str) -> dict[str, Any]:
        return await svc.tenants.get(tenant_id)

    @api.delete("/tenants/{tenant_id}")
    async def delete_tenant(tenant_id: str) -> dict[str, Any]:
        """Revoke every key, erase personal data, pseudonymise usage and ledger (idempotent)."""
        return await svc.tenants.delete(tenant_id)

    @api.get("/tenants/{tenant_id}/export")
    async def export_tenant(tenant_id: str) -> JSONResponse:
        """Everything held about the tenant, as a JSON download."""
        data = await svc.tenants.export(tenant_id)
        return JSONResponse(jsonable_encoder(data), headers={
            "content-disposition": f'attachment; filename="tollway-export-{tenant_id}.json"',
            "cache-control": "no-store"})

    @api.post("/tenants/{tenant_id}/keys")
    async def create_key(tenant_id: str, body: KeyIn) -> dict[str, Any]:
        limit = usd(body.spend_limit_usd, "spend_limit_usd") if body.spend_limit_usd else None
        return await svc.keys.create(tenant_id, name=body.name, expires_at=body.expires_at,
                                     spend_limit_micros=limit, spend_limit_period=body.spend_limit_period)

    @api.get("/tenants/{tenant_id}/keys")
    async def list_keys(tenant_id: str) -> dict[str, Any]:
        return {"tenant_id": tenant_id, "keys": await svc.keys.list(tenant_id)}

    @api.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: str) -> dict[str, Any]:
        return await svc.keys.revoke(key_id)

    @api.post("/tenants/{tenant_id}/wallet/credit")
    async def credit(tenant_id: str, body: CreditIn) -> dict[str, Any]:
        amount = usd(body.amount_usd, "amount_usd")
        result = await svc.ledger.credit_manual(tenant_id, amount, body.reference)
        return {"applied": result["applied"], "balance_usd": format_usd(result["balance_micros"])}

    @api.get("/tenants/{tenant_id}/wallet")
    async def wallet(tenant_id: str) -> dict[str, Any]:
        return await svc.ledger.wallet(tenant_id)

    @api.post("/tenants/{tenant_id}/topups")
    async def create_topup(tenant_id: str, body: TopupIn) -> dict[str, Any]:
        """A Stripe Checkout Session; the wallet is credited by the verified webhook only."""
        from tollway.webhooks.stripe import start_topup  # stripe-python loads only when used

        return await start_topup(svc.payments, tenant_id, body.amount_usd, idempotency_key=body.idempotency_key)

    @api.get("/ledger/verify")
    async def verify() -> dict[str, Any]:
        problems = await svc.ledger.verify(svc.config.server.max_request_ms)
        return {"ok": not problems, "problems": problems}

    return TokenGate(api, svc.config.server.admin_token_env)
