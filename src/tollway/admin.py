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
import re
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.config import JsonDict
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tollway.bodycap import refuse
from tollway.config import MAX_PER_MINUTE
from tollway.errors import BadRequest, NotFound, TollwayError, Unauthorized, render_json
from tollway.ledger.transactions import MANUAL_REFERENCE_MAX
from tollway.money import MoneyError, format_usd, parse_operator_usd
from tollway.services import Services

# An operator's amount as parse_operator_usd takes it: positive, at most 6 decimals, below
# MAX_OPERATOR_MICROS. Said in the document so a generated client cannot send one it refuses.
POSITIVE_USD = (r"^([1-9][0-9]{0,8}(\.[0-9]{1,6})?|0\.([1-9][0-9]{0,5}|0[1-9][0-9]{0,4}|00[1-9][0-9]{0,3}"
                r"|000[1-9][0-9]{0,2}|0000[1-9][0-9]?|00000[1-9]))$")


# PostgreSQL text holds no NUL character and a driver encodes no unpaired surrogate: both
# were a 500 there (and stored on SQLite). Refused alike on both, and said in the document.
TEXT = r"^[^\x00]*$"
ID = Annotated[str, Path(pattern=r"^[^\x00]{1,40}$", description="an id as the API gave it (at most 40 characters)")]


def storable(value: str) -> str:
    if "\x00" in value or any("\ud800" <= c <= "\udfff" for c in value):
        raise ValueError("NUL characters and unpaired surrogates cannot be stored")
    return value


class _In(BaseModel):
    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        return storable(value) if isinstance(value, str) else value


class TenantIn(_In):
    name: str | None = Field(default=None, max_length=200, pattern=TEXT)
    email: str | None = Field(default=None, max_length=320, pattern=TEXT)


# Both parts of a spend limit or neither (null counts as absent), as Keys.create requires.
_SPEND_LIMIT_PAIR: JsonDict = {"anyOf": [
    {"required": ["spend_limit_usd", "spend_limit_period"],
     "properties": {"spend_limit_usd": {"type": "string"}, "spend_limit_period": {"type": "string"}}},
    {"properties": {"spend_limit_usd": {"type": "null"}, "spend_limit_period": {"type": "null"}}},
]}


_RPM = "the key's own requests per minute; 0: unlimited; null or absent: the [limits] default"
_TPM = "the key's own tokens (prompt + completion) per minute; 0: unlimited; null or absent: the [limits] default"


class KeyLimitsIn(_In):
    """Only the limits named change; null puts one back to the [limits] default."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    requests_per_minute: int | None = Field(default=None, ge=0, le=MAX_PER_MINUTE, description=_RPM)
    tokens_per_minute: int | None = Field(default=None, ge=0, le=MAX_PER_MINUTE, description=_TPM)

    @model_validator(mode="after")
    def _some(self) -> KeyLimitsIn:
        if not self.model_fields_set:
            raise ValueError("name requests_per_minute and/or tokens_per_minute")
        return self


class KeyIn(_In):
    model_config = ConfigDict(json_schema_extra=_SPEND_LIMIT_PAIR)

    name: str | None = Field(default=None, max_length=200, pattern=TEXT)
    expires_at: int | None = Field(default=None, ge=0, le=2**53,
                                   description="unix epoch milliseconds, in the future (400 otherwise)")
    spend_limit_usd: str | None = Field(default=None, pattern=POSITIVE_USD, description='decimal string, e.g. "10.00"')
    spend_limit_period: str | None = Field(default=None, pattern="^(day|month)$")
    requests_per_minute: int | None = Field(default=None, ge=0, le=MAX_PER_MINUTE, description=_RPM)
    tokens_per_minute: int | None = Field(default=None, ge=0, le=MAX_PER_MINUTE, description=_TPM)

    @model_validator(mode="after")
    def _pair(self) -> KeyIn:
        if (self.spend_limit_usd is None) != (self.spend_limit_period is None):
            raise ValueError("spend limit needs both spend_limit_usd and spend_limit_period (day or month)")
        return self


class CreditIn(_In):
    amount_usd: str = Field(pattern=POSITIVE_USD, description='decimal string, e.g. "5.00"')
    reference: str = Field(min_length=1, max_length=MANUAL_REFERENCE_MAX, pattern=TEXT,
                           description="idempotency reference")


class TopupIn(_In):
    # The decimal grammar only: the range is the config's ([stripe] min/max, 400 amount_out_of_range).
    amount_usd: str = Field(pattern=r"^-?[0-9]{1,12}(\.[0-9]{1,6})?$",
                            description='decimal string, e.g. "20.00", within [stripe] min/max')
    idempotency_key: str | None = Field(default=None, max_length=80, pattern=TEXT, description="same key, same session")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorOut(BaseModel):
    """Every refusal of the operator API, OpenAI-style."""

    error: ErrorDetail


class _Out(BaseModel):
    # Documents the answer; a field added later is still sent, not filtered out.
    model_config = ConfigDict(extra="allow")


class TenantCreated(_Out):
    tenant_id: str
    name: str | None
    email: str | None


class TenantOut(_Out):
    id: str
    name: str | None
    email: str | None
    external_id: str | None
    created_at: int
    deletion_requested_at: int | None


class KeyCreated(_Out):
    key_id: str
    key: str = Field(description="shown once")
    tenant_id: str
    prefix: str


class KeyOut(_Out):
    id: str
    tenant_id: str
    name: str | None
    prefix: str
    created_at: int
    last_used_at: int | None
    revoked_at: int | None
    expires_at: int | None
    spend_limit_micros: int | None
    spend_limit_period: str | None
    requests_per_minute: int | None = Field(default=None, description=_RPM)
    tokens_per_minute: int | None = Field(default=None, description=_TPM)


class KeyLimits(_Out):
    key_id: str
    requests_per_minute: int | None = Field(description=_RPM)
    tokens_per_minute: int | None = Field(description=_TPM)


class KeyList(_Out):
    tenant_id: str
    keys: list[KeyOut]


class KeyRevoked(_Out):
    key_id: str
    revoked_at: int


class Credited(_Out):
    applied: bool = Field(description="false: this reference was credited before (same amount)")
    balance_usd: str


class WalletOut(_Out):
    tenant_id: str
    balance_usd: str
    balance_micros: int
    reserved_usd: str
    reserved_micros: int


class Verified(_Out):
    ok: bool
    problems: list[Any]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    reasons = {400: "invalid request (body, parameter or value)", 401: "missing or wrong admin token",
               404: "no such object, a deleted tenant, or the admin API is off",
               409: "conflicts with what is already recorded"}
    return {s: {"model": ErrorOut, "description": reasons[s]} for s in (400, 401, *statuses)}


class MethodNotAllowed(TollwayError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


def document(api: FastAPI) -> dict[str, Any]:
    """The OpenAPI document as the API behaves: the bearer token on every operation, and
    no 422 (validation errors are answered 400 by the handler below)."""
    doc = api.openapi()
    doc.setdefault("components", {})["securitySchemes"] = {"adminToken": {"type": "http", "scheme": "bearer"}}
    doc["security"] = [{"adminToken": []}]
    for item in doc["paths"].values():
        for operation in item.values():
            operation.get("responses", {}).pop("422", None)
    for unused in ("HTTPValidationError", "ValidationError"):
        doc["components"].get("schemas", {}).pop(unused, None)
    return doc


def http_refusal(exc: HTTPException, path: str, allow: str | None = None) -> Response:
    """Starlette's and FastAPI's own refusals ({"detail": ...} or plain text) as OpenAI-style JSON."""
    if exc.status_code == 404:
        return render_json(NotFound(f"no operation at {path!r}"))
    if exc.status_code == 405:
        allow = allow or (exc.headers or {}).get("allow") or (exc.headers or {}).get("Allow", "")
        return render_json(MethodNotAllowed("method not allowed here", headers={"allow": allow}))
    return render_json(BadRequest(str(exc.detail)))


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
    # servers: the paths of the document resolve under the mount point for any generated client.
    api = FastAPI(title="Tollway admin API", version="1", openapi_url=None, docs_url=None, redoc_url=None,
                  servers=[{"url": "/admin"}])

    @api.exception_handler(TollwayError)
    async def _err(_: Request, exc: TollwayError) -> Any:
        return render_json(exc)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Any:
        # FastAPI's own 422 is not OpenAI-style and quotes the input back; name the field only.
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = ".".join(where) or None
        reason = str(first.get("msg", "invalid request body")).removeprefix("Value error, ")
        return render_json(BadRequest(f"{field}: {reason}" if field else reason, param=field))

    @api.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Any:
        # Starlette names the methods of the first route that matched the path only; the
        # path's other routes (GET and DELETE of a tenant) are as much allowed.
        allowed = sorted({m for r in api.routes
                          if isinstance(r, APIRoute) and r.matches(request.scope)[0] is not Match.NONE
                          for m in r.methods or ()})
        return http_refusal(exc, request.url.path, ", ".join(allowed))

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(document(api))

    @api.post("/tenants", responses=_errors(), response_model=TenantCreated)
    async def create_tenant(body: TenantIn) -> Any:
        return await svc.tenants.create(body.name, body.email)

    @api.get("/tenants/{tenant_id}", responses=_errors(404), response_model=TenantOut)
    async def get_tenant(tenant_id: ID) -> Any:
        return await svc.tenants.get(tenant_id)

    @api.delete("/tenants/{tenant_id}", responses=_errors(404, 409))
    async def delete_tenant(tenant_id: ID) -> dict[str, Any]:
        """Revoke every key, erase personal data, pseudonymise usage and ledger (idempotent)."""
        return await svc.tenants.delete(tenant_id)

    @api.get("/tenants/{tenant_id}/export", responses=_errors(404))
    async def export_tenant(tenant_id: ID) -> JSONResponse:
        """Everything held about the tenant, as a JSON download."""
        data = await svc.tenants.export(tenant_id)
        return JSONResponse(jsonable_encoder(data), headers={
            "content-disposition": f'attachment; filename="tollway-export-{tenant_id}.json"',
            "cache-control": "no-store"})

    @api.post("/tenants/{tenant_id}/keys", responses=_errors(404), response_model=KeyCreated)
    async def create_key(tenant_id: ID, body: KeyIn) -> Any:
        limit = usd(body.spend_limit_usd, "spend_limit_usd") if body.spend_limit_usd else None
        return await svc.keys.create(tenant_id, name=body.name, expires_at=body.expires_at,
                                     spend_limit_micros=limit, spend_limit_period=body.spend_limit_period,
                                     requests_per_minute=body.requests_per_minute,
                                     tokens_per_minute=body.tokens_per_minute)

    @api.get("/tenants/{tenant_id}/keys", responses=_errors(404), response_model=KeyList)
    async def list_keys(tenant_id: ID) -> Any:
        await svc.tenants.get(tenant_id)  # a deleted or unknown tenant is 404 here as everywhere
        return {"tenant_id": tenant_id, "keys": await svc.keys.list(tenant_id)}

    @api.patch("/keys/{key_id}", responses=_errors(404), response_model=KeyLimits)
    async def set_key_limits(key_id: ID, body: KeyLimitsIn) -> Any:
        """A key's own rate limits; in force within cache.key_ttl_seconds (docs/keys.md)."""
        return await svc.keys.set_rate_limits(key_id, **body.model_dump(include=body.model_fields_set))

    @api.post("/keys/{key_id}/revoke", responses=_errors(404), response_model=KeyRevoked)
    async def revoke_key(key_id: ID) -> Any:
        return await svc.keys.revoke(key_id)

    @api.post("/tenants/{tenant_id}/wallet/credit", responses=_errors(404, 409), response_model=Credited)
    async def credit(tenant_id: ID, body: CreditIn) -> Any:
        amount = usd(body.amount_usd, "amount_usd")
        # An unknown id is 404 before the entry id (tenant and reference) is measured against its column.
        await svc.tenants.get(tenant_id)
        result = await svc.ledger.credit_manual(tenant_id, amount, body.reference)
        return {"applied": result["applied"], "balance_usd": format_usd(result["balance_micros"])}

    @api.get("/tenants/{tenant_id}/wallet", responses=_errors(404), response_model=WalletOut)
    async def wallet(tenant_id: ID) -> Any:
        return await svc.ledger.wallet(tenant_id)

    @api.post("/tenants/{tenant_id}/topups", responses=_errors(404, 409))
    async def create_topup(tenant_id: ID, body: TopupIn) -> dict[str, Any]:
        """A Stripe Checkout Session; the wallet is credited by the verified webhook only."""
        from tollway.webhooks.stripe import start_topup  # stripe-python loads only when used

        return await start_topup(svc.payments, tenant_id, body.amount_usd, idempotency_key=body.idempotency_key)

    @api.get("/ledger/verify", responses=_errors(), response_model=Verified)
    async def verify() -> Any:
        problems = await svc.ledger.verify(svc.config.server.max_request_ms)
        return {"ok": not problems, "problems": problems}

    return TokenGate(api, svc.config.server.admin_token_env)


def admin_mount(svc: Services) -> Mount:
    """/admin/*, the token gate first for every path under it. Starlette's mount pattern
    ends in `.*`, which stops at a newline: /admin/tenants/%0A/export would fall past the
    gate to the gateway's own 404 (a different answer without the token than with it)."""
    mount = Mount("/admin", app=admin_app(svc))
    mount.path_regex = re.compile(mount.path_regex.pattern, re.DOTALL)
    return mount
