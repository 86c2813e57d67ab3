"""POST /v1/messages/count_tokens: Anthropic's token counting for Anthropic models, not billed.

Coding agents call it before a request to size their context. It is checked as any /v1
call: the customer's key (401 without a valid one), the body read under
`server.max_body_bytes` (413), the slug resolved (404 for an unknown model, 400 for a
model that is not of an `anthropic` provider), and the `anthropic-beta` allow-list of
/v1/messages (a beta such as the Files API would let a count read what the operator's
account stores). Then the slug becomes the provider's model name, the operator's key is
attached (client headers pass the same allow-list, privacy.forwarded_headers), so is the
attribution header of every upstream call (Pipeline.attributed), and the provider's
answer (`{"input_tokens": N}`) is returned unchanged; an error is mapped and scrubbed as
on every /v1 call (Pipeline._upstream_failure).

Not billed: the provider does not charge for counting, so nothing is reserved or charged
and the wallet does not change. It still spends the operator's provider quota (counting
has a rate limit of its own per account), so a tenant whose wallet is empty (nothing left
to spend) gets the 402 it would get on the call it is counting for: an unfunded sign-up
cannot use the operator's account as a free tokenizer. No usage row (those are the
ledger's, written by a settle); the log line says `cost_micros` 0, and the access log
has its row as for any request.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tollway.auth.keys import Principal, bearer_key
from tollway.edge import new_request_id
from tollway.errors import (
    BadRequest,
    InsufficientFunds,
    ModelNotFound,
    ServiceUnavailable,
    TollwayError,
    render_json,
)
from tollway.privacy import forwarded_headers, returned_headers
from tollway.providers.anthropic import DEFAULT_VERSION, messages_url
from tollway.providers.base import MESSAGES, UpstreamRequest, merge_headers
from tollway.proxy import priced
from tollway.proxy.inbound import ClientGone, header_map, model_slug, parse_json, read_body
from tollway.proxy.pipeline import Pipeline, Route
from tollway.proxy.upstream import json_object
from tollway.telemetry import record_request

PATH = "/v1/messages/count_tokens"


class TokenCounter:
    """The ASGI endpoint of PATH (routes.py), over the pipeline's routes and upstream client."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.setdefault("state", {})
        request_id = str(state.get("request_id") or new_request_id())
        started = time.perf_counter()
        facts: dict[str, Any] = {"status": 200}
        try:
            response = await self._count(scope, receive, state, request_id, facts)
        except ClientGone:
            facts.update(status=499, error_type="client_disconnected")
            self._record(request_id, facts, started)
            return
        except TollwayError as exc:
            facts.update(status=exc.status, error_type=type(exc).__name__, error_code=exc.instance_code)
            self._record(request_id, facts, started)
            await render_json(exc, request_id, anthropic=True)(scope, receive, send)
            return
        self._record(request_id, facts, started)
        await response(scope, receive, send)

    async def _count(self, scope: Scope, receive: Receive, state: dict[str, Any], request_id: str,
                     facts: dict[str, Any]) -> Response:
        svc = self.pipeline.svc
        headers = header_map(scope)
        principal: Principal = await svc.keys.authenticate(bearer_key(headers))
        state["tenant_id"] = facts["tenant_id"] = principal.tenant_id
        facts["key_id"] = principal.key_id
        body = parse_json(await read_body(receive, headers, self.pipeline.max_body))
        route = self._route(model_slug(body))
        facts.update(model=route.target.slug, provider=route.target.provider)
        priced.check_headers(headers)
        if route.transport is None:
            raise ServiceUnavailable(f"The model '{route.target.slug}' is not available right now: its provider "
                                     f"has no key configured on this gateway.")
        if await svc.ledger.balance(principal.tenant_id) <= 0:
            raise InsufficientFunds("Your wallet is empty. Top up to continue (counting tokens is free, but only "
                                    "for a wallet that can pay for the request it counts for).")
        body["model"] = route.target.upstream_model
        out = merge_headers(forwarded_headers(headers.items()), route.target.headers,
                            self.pipeline.attributed(principal, request_id))
        out.setdefault("anthropic-version", DEFAULT_VERSION)
        resp = await route.transport.send(UpstreamRequest(
            messages_url(route.target.base_url) + "/count_tokens", out, orjson.dumps(body), False))
        facts["upstream_status"] = resp.status
        if not 200 <= resp.status < 300:
            raise await self.pipeline._upstream_failure(route, resp)
        answer = await json_object(resp, self.pipeline.max_response)
        extra = {k: v for k, v in returned_headers(resp.headers).items() if k != "content-type"}
        return Response(orjson.dumps(answer), headers=extra, media_type="application/json")

    def _route(self, slug: str) -> Route:
        route = self.pipeline.routes.get(slug)
        if route is None:
            raise ModelNotFound(f"The model '{slug[:200]}' does not exist or you do not have access to it.",
                                param="model")
        if MESSAGES not in route.adapter.endpoints:
            raise BadRequest(f"The model '{slug}' is not an Anthropic model: {PATH} counts tokens for Anthropic "
                             f"models only.", param="model")
        return route

    @staticmethod
    def _record(request_id: str, facts: dict[str, Any], started: float) -> None:
        # Not billed: cost 0 on success, nothing (None) when it failed, as on every /v1 error.
        cost = 0 if facts["status"] == 200 else None
        record_request(request_id=request_id, method="POST", path=PATH, stream=False, cost_micros=cost,
                       cost_usd="0.000000" if cost == 0 else None,
                       latency_ms=int((time.perf_counter() - started) * 1000), **facts)
