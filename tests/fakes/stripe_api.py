"""A fake Stripe API for loopback tests: POST /v1/checkout/sessions, form-encoded like the
real one, and GET /v1/checkout/sessions?payment_intent=pi_..., recording every request it
receives. `pay(session_id, pi)` is the customer paying on the hosted page.

It answers the way Stripe does where Tollway depends on it: bearer-key authentication
(401 with a Stripe error body otherwise), `Idempotency-Key` replays returning the first
response, and a Checkout Session object with `id`, `url` and the echoed parameters.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass
class Recorded:
    headers: dict[str, str]
    form: dict[str, str]             # flat Stripe form keys: "line_items[0][price_data][currency]"
    content_type: str


@dataclass
class FakeStripe:
    api_key: str
    requests: list[Recorded] = field(default_factory=list)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail_with: tuple[int, dict[str, Any]] | None = None   # (status, body) for the next requests
    _by_idempotency_key: dict[str, dict[str, Any]] = field(default_factory=dict)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/checkout/sessions", self.create_session, methods=["POST"]),
                                 Route("/v1/checkout/sessions", self.list_sessions, methods=["GET"])])

    def pay(self, session_id: str, pi: str) -> None:
        self.sessions[session_id].update(payment_intent=pi, payment_status="paid", status="complete")

    async def list_sessions(self, request: Request) -> Response:
        form = dict(request.query_params)
        self.requests.append(Recorded(dict(request.headers), form, ""))
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "invalid_request_error", "Invalid API Key provided")
        if self.fail_with is not None:
            status, err = self.fail_with
            return JSONResponse({"error": err}, status_code=status, headers={"stripe-should-retry": "false"})
        found = [s for s in self.sessions.values()
                 if "payment_intent" not in form or s["payment_intent"] == form["payment_intent"]]
        return JSONResponse({"object": "list", "url": "/v1/checkout/sessions", "has_more": False,
                             "data": found[: int(form.get("limit", "10"))]})

    async def create_session(self, request: Request) -> Response:
        body = (await request.body()).decode()
        form = dict(parse_qsl(body, keep_blank_values=True))
        self.requests.append(Recorded(dict(request.headers), form, request.headers.get("content-type", "")))
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            # Stripe's real message quotes part of the key; Tollway must not pass it on.
            return _error(401, "invalid_request_error",
                          f"Invalid API Key provided: {request.headers.get('authorization', '')[7:]}")
        if self.fail_with is not None:
            status, err = self.fail_with
            return JSONResponse({"error": err}, status_code=status, headers={"stripe-should-retry": "false"})
        key = request.headers.get("idempotency-key", "")
        if key in self._by_idempotency_key:
            return JSONResponse(self._by_idempotency_key[key])
        session_id = "cs_test_" + secrets.token_hex(16)
        meta = {k[len("metadata["):-1]: v for k, v in form.items() if k.startswith("metadata[")}
        quantity = int(form.get("line_items[0][quantity]", "1"))
        session = {
            "id": session_id, "object": "checkout.session", "mode": form.get("mode"),
            "url": f"https://checkout.stripe.com/c/pay/{session_id}",
            "amount_total": int(form["line_items[0][price_data][unit_amount]"]) * quantity,
            "currency": form.get("line_items[0][price_data][currency]"),
            "client_reference_id": form.get("client_reference_id"), "metadata": meta,
            "payment_status": "unpaid", "status": "open", "payment_intent": None,
            "success_url": form.get("success_url"), "cancel_url": form.get("cancel_url"),
        }
        self.sessions[session_id] = session
        self._by_idempotency_key[key] = session
        return JSONResponse(session)


def _error(status: int, kind: str, message: str) -> Response:
    return Response(json.dumps({"error": {"type": kind, "message": message}}), status_code=status,
                    media_type="application/json", headers={"stripe-should-retry": "false"})
