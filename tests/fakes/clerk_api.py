"""A fake Clerk Backend API for loopback tests: verify, create, list and revoke API keys,
answering with the shapes of Clerk's OpenAPI spec (docs/keys.md, integrations notes) and
recording every request it receives.

`mode` makes every call fail the way Clerk can: "401" (our secret is wrong), "429", "500",
"timeout" (no answer for 30 s), "garbage" (a 200 without the documented fields). `delay`
also slows successful answers, so that concurrent requests overlap one call.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def subject(kind: str = "user") -> str:
    return f"{kind}_" + secrets.token_hex(14)[:27]


@dataclass
class Recorded:
    method: str
    path: str
    authorization: str | None
    body: Any


@dataclass
class FakeClerk:
    secret_key: str
    mode: str = "ok"
    delay: float = 0.0
    requests: list[Recorded] = field(default_factory=list)
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)   # by secret

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/api_keys/verify", self.verify, methods=["POST"]),
            Route("/v1/api_keys", self.create, methods=["POST"]),
            Route("/v1/api_keys", self.list, methods=["GET"]),
            Route("/v1/api_keys/{key_id}/revoke", self.revoke, methods=["POST"]),
        ])

    def add_key(self, subj: str, *, name: str = "test key", revoked: bool = False, expired: bool = False,
                expiration: int | None = None) -> tuple[str, str]:
        """(secret, key id) of a key Clerk knows."""
        secret = "ak_" + secrets.token_hex(24)
        key_id = "ak_" + secrets.token_hex(16)
        now = int(time.time() * 1000)
        self.keys[secret] = {
            "object": "api_key", "id": key_id, "type": "api_key", "subject": subj, "name": name,
            "description": None, "claims": None, "scopes": [], "revoked": revoked, "revocation_reason": None,
            "expired": expired, "expiration": expiration, "created_by": None, "last_used_at": None,
            "created_at": now, "updated_at": now}
        return secret, key_id

    def calls(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    @property
    def verify_calls(self) -> list[Recorded]:
        return self.calls("/v1/api_keys/verify")

    async def _gate(self, request: Request) -> Response | None:
        body = await request.json() if request.method == "POST" else dict(request.query_params)
        self.requests.append(Recorded(request.method, request.url.path, request.headers.get("authorization"), body))
        if self.delay or self.mode == "timeout":
            await asyncio.sleep(self.delay if self.mode != "timeout" else 30)
        if self.mode == "401" or request.headers.get("authorization") != f"Bearer {self.secret_key}":
            return _error(401, "authentication_invalid", "The provided secret key is invalid")
        if self.mode == "429":
            return _error(429, "too_many_requests", "Too many requests")
        if self.mode == "500":
            return _error(500, "internal_error", "Something went wrong")
        if self.mode == "garbage":  # a 200 that is not what Clerk documents
            return JSONResponse({"object": "api_key", "subject": None})
        return None

    async def verify(self, request: Request) -> Response:
        if (refused := await self._gate(request)) is not None:
            return refused
        body = await request.json()
        key = self.keys.get(body.get("secret", "")) if isinstance(body, dict) else None
        if key is None:
            return _error(404, "resource_not_found", "API key not found")
        return JSONResponse(key)

    async def create(self, request: Request) -> Response:
        if (refused := await self._gate(request)) is not None:
            return refused
        body = await request.json()
        if not isinstance(body.get("name"), str) or not isinstance(body.get("subject"), str):
            return _error(400, "form_param_missing", "name and subject are required")
        seconds = body.get("seconds_until_expiration")
        expiration = int(time.time() * 1000 + seconds * 1000) if seconds else None
        secret, _ = self.add_key(body["subject"], name=body["name"], expiration=expiration)
        return JSONResponse({**self.keys[secret], "secret": secret})

    async def list(self, request: Request) -> Response:
        if (refused := await self._gate(request)) is not None:
            return refused
        q = request.query_params
        found = [k for k in self.keys.values() if k["subject"] == q.get("subject")
                 and (q.get("include_invalid") == "true" or not (k["revoked"] or k["expired"]))]
        offset, limit = int(q.get("offset", 0)), int(q.get("limit", 10))
        return JSONResponse({"data": found[offset:offset + limit], "total_count": len(found)})

    async def revoke(self, request: Request) -> Response:
        if (refused := await self._gate(request)) is not None:
            return refused
        for key in self.keys.values():
            if key["id"] == request.path_params["key_id"]:
                key.update(revoked=True, revocation_reason=(await request.json()).get("revocation_reason"),
                           updated_at=int(time.time() * 1000))
                return JSONResponse(key)
        return _error(404, "resource_not_found", "API key not found")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"errors": [{"message": message, "long_message": message, "code": code}]},
                        status_code=status)
