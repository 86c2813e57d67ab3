"""The one place that orders a /v1 call:
authenticate -> read -> resolve -> reserve -> forward -> meter -> settle -> record.

Money rules kept here:
* Nothing is forwarded before the reservation holds the most the call can cost
  (inbound.shape): prompt bound = request body size in bytes (a byte-level BPE token
  decodes to at least one byte, and JSON never encodes text in fewer bytes than it has;
  token-id arrays take at least two bytes per id) plus the prompt a provider adds for
  tools, capped by the model's context window, or that window for inputs whose bytes do
  not bound their tokens (images, documents); output bound = (max_completion_tokens or
  max_tokens, at most the model's max_output_tokens) x n, written into the body so the
  provider enforces it. What would change the price per token is refused (priced.py).
* Every reservation is settled exactly once: with the metered cost on success, with an
  estimate (base.py) when a started call reported no usage, with the conservative rule
  (disconnect.py) when a stream's client left before the provider's usage could be read,
  with 0 on every error path. The request is in `Ledger.live` meanwhile: never swept.
  Settles run shielded from cancellation, or within one step of the loop, where nothing can cancel them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from tollway import config as config_mod
from tollway.auth.keys import Principal, bearer_key
from tollway.config import ModelConfig
from tollway.edge import new_request_id
from tollway.errors import (
    BadRequest,
    ModelNotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    TollwayError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    render_json,
)
from tollway.money import Prices, Usage, cost, format_usd, max_cost
from tollway.privacy import forwarded_headers, returned_headers, scrub, scrub_identifier
from tollway.providers import ADAPTERS
from tollway.providers.base import (
    EMBEDDINGS,
    MESSAGES,
    Adapter,
    InvalidUsage,
    Target,
    Transport,
    UpstreamResponse,
    estimate_prompt_tokens,
    merge_headers,
    text_bytes_of,
    tokens_from_bytes,
    upstream_error_details,
)
from tollway.providers.echo import EchoTransport
from tollway.providers.tenant_tag import TenantTagger, resolve_fields
from tollway.proxy.disconnect import conservative_usage
from tollway.proxy.inbound import ClientGone, header_map, model_slug, parse_json, read_body, shape
from tollway.proxy.relay import Relay, RelayLimits, StreamEnd, shielded
from tollway.proxy.upstream import Upstream
from tollway.services import Services
from tollway.store.db import retry_while_unavailable
from tollway.telemetry import log, record_request

ERROR_BODY_CAP = 65_536
SETTLE_RETRY_SECONDS = 30.0  # rides out a database restart; then the sweep policy applies
_TEXT_KEYS = frozenset({"content", "text", "arguments", "reasoning_content", "reasoning", "thinking"})
# The gateway, not the provider, ended these streams (silence, the total timeout): the
# provider bills what it generated until then, hidden reasoning included (disconnect.py).
_GATEWAY_CUTS = frozenset({"upstream_stalled", "upstream_timeout"})
_ENDPOINT_OF = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
                "embeddings": "/v1/embeddings", "messages": "/v1/messages"}


@dataclass(frozen=True, slots=True)
class Route:
    """A configured model with everything the hot path needs, built once."""

    target: Target
    model: ModelConfig
    adapter: Adapter
    transport: Transport | None  # None: the provider's key is missing
    prices: Prices
    secrets: tuple[str, ...]  # what scrub() must remove from anything sent back
    tenant_fields: str = "none"  # tenant_tag.resolve_fields of its provider


class Call:
    """One request's facts, for the settle, the usage row and the log line."""

    __slots__ = ("body", "charge_reserved", "endpoint", "error_code", "error_type", "output_bound", "principal",
                 "prompt_bound", "recorded", "request_id", "reserved", "route", "settled", "started", "status",
                 "stream", "upstream_status")

    def __init__(self, request_id: str, endpoint: str) -> None:
        self.request_id = request_id
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.principal: Principal | None = None
        self.route: Route | None = None
        self.body: dict[str, Any] = {}
        self.stream = False
        self.status = 200
        self.error_type: str | None = None
        self.error_code: str | None = None
        self.upstream_status: int | None = None
        self.settled = False
        self.recorded = False
        self.reserved = 0
        self.charge_reserved = False  # the provider's usage report was refused (`_invalid_usage`)
        self.prompt_bound = 0  # what the reservation holds: tokens of prompt and of output
        self.output_bound = 0

    def failed(self, exc: TollwayError) -> None:
        self.status = exc.status
        self.error_type = type(exc).__name__
        self.error_code = exc.instance_code


def build_routes(cfg: config_mod.Config, provider_keys: dict[str, Any], upstream: Transport,
                 echo: Transport) -> dict[str, Route]:
    used = {m.provider for m in cfg.models}
    cf_tokens = {  # resolved like provider keys: at start-up, only for providers in use
        name: config_mod.resolve_secret(p.cf_aig_token_env, path=f"providers.{name}.cf_aig_token_env",
                                        source=cfg.source).reveal()
        for name, p in cfg.providers.items() if p.cf_aig_token_env and name in used
    }
    routes: dict[str, Route] = {}
    for m in cfg.models:
        provider = cfg.providers[m.provider]
        adapter = ADAPTERS[provider.type]
        secret = provider_keys.get(m.provider)
        key = secret.reveal() if isinstance(secret, config_mod.Secret) else (str(secret) if secret else "")
        transport = echo if adapter.in_process else (upstream if key else None)
        cf_token = cf_tokens.get(m.provider)
        target = Target(m.id, m.upstream, m.provider, provider.base_url,
                        adapter.static_headers(provider, key, cf_token), provider.max_tokens_field)
        prices = Prices(m.input_usd_per_mtok, m.output_usd_per_mtok, m.cached_input_usd_per_mtok,
                        m.reasoning_usd_per_mtok, m.cache_write_usd_per_mtok)
        routes[m.id] = Route(target, m, adapter, transport, prices, tuple(s for s in (key, cf_token) if s),
                             resolve_fields(provider))
    return routes


class Pipeline:
    def __init__(self, svc: Services, provider_keys: dict[str, Any]) -> None:
        cfg = svc.config
        self.svc = svc
        self.max_body = cfg.server.max_body_bytes
        self.attribution = cfg.attribution.header.lower() if cfg.attribution else None
        self.upstream = Upstream(cfg.server.request_timeout_seconds, cfg.server.stream_idle_timeout_seconds)
        self.request_timeout = cfg.server.request_timeout_seconds
        self.relay_limits = RelayLimits(cfg.server.disconnect_drain_seconds, cfg.server.disconnect_drain_bytes)
        self.live = svc.ledger.live
        self.routes = build_routes(cfg, provider_keys, self.upstream, EchoTransport())
        self.tenant_tags = TenantTagger(svc.keys.secret)
        self.limiter = svc.limiter

    async def start(self) -> None:
        await self.upstream.start()

    async def close(self) -> None:
        await self.upstream.close()

    async def __call__(self, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.setdefault("state", {})
        call = Call(str(state.get("request_id") or new_request_id()), endpoint)
        try:
            await self._serve(call, state, scope, receive, send)
        except ClientGone:
            call.status, call.error_type = 499, "client_disconnected"
            self._record(call, None, None)
        except TollwayError as exc:
            if not call.recorded:
                call.failed(exc)
                self._record(call, None, None)
            await render_json(exc, call.request_id)(scope, receive, send)
        finally:
            self.live.discard(call.request_id)

    async def _serve(self, call: Call, state: dict[str, Any], scope: Scope, receive: Receive, send: Send) -> None:
        headers = header_map(scope)
        call.principal = principal = await self.svc.keys.authenticate(bearer_key(headers))
        state["tenant_id"] = principal.tenant_id
        await self.limiter.admit(principal, state)  # 429 here forwards and reserves nothing
        raw = await read_body(receive, headers, self.max_body)
        call.body = body = parse_json(raw)
        call.route = route = self._resolve(call.endpoint, model_slug(body))
        sh = shape(call.endpoint, body, len(raw), route.model, headers, route.target.output_field)
        call.stream = sh.stream
        call.prompt_bound, call.output_bound = sh.prompt_bound, sh.completion_bound
        if route.transport is None:
            raise ServiceUnavailable(f"The model '{route.target.slug}' is not available right now: its provider "
                                     f"has no key configured on this gateway.")
        call.reserved = max_cost(sh.prompt_bound, sh.completion_bound, route.prices)
        self.live.add(call.request_id)  # from here until it ends, the sweep leaves its hold alone
        try:
            await self.svc.ledger.reserve(
                principal.tenant_id, call.request_id, call.reserved,
                key_id=principal.key_id, key_limit_micros=principal.spend_limit_micros,
                key_period=principal.spend_period(), worker_id=self.svc.workers.worker_id)
        except asyncio.CancelledError:
            # The hold may have been committed after all (transact waits for its end).
            await shielded(self.svc.ledger.release(call.request_id))
            raise
        try:
            await self._forward(call, route, headers, sh.stream, sh.wants_usage, scope, receive, send)
        except BaseException as exc:
            if not call.settled:  # every error path releases the whole reservation
                if isinstance(exc, TollwayError):
                    call.failed(exc)
                else:
                    call.status, call.error_type = 500, type(exc).__name__
                await shielded(self._settle(call, None))
            raise

    def _resolve(self, endpoint: str, slug: str) -> Route:
        route = self.routes.get(slug)
        if route is None:
            raise ModelNotFound(f"The model '{slug[:200]}' does not exist or you do not have access to it.",
                                param="model")
        kind = route.model.kind
        if (kind == "embedding") != (endpoint == EMBEDDINGS):
            where = "POST /v1/embeddings" if kind == "embedding" else "a generation endpoint"
            raise BadRequest(f"The model '{slug}' is a {kind} model; call {where}.", param="model")
        if endpoint not in route.adapter.endpoints:
            where = "POST /v1/messages" if MESSAGES in route.adapter.endpoints else "POST /v1/chat/completions"
            raise BadRequest(f"The model '{slug}' is not served on {_ENDPOINT_OF[endpoint]}; call {where}.",
                             param="model")
        return route

    async def _forward(self, call: Call, route: Route, headers: dict[str, str], stream: bool, wants_usage: bool,
                       scope: Scope, receive: Receive, send: Send) -> None:
        assert call.principal is not None and route.transport is not None
        per_request: dict[str, str] = {}
        if self.attribution:
            # Flat and at most 5 entries (Cloudflare's limit); ids only, nothing from the prompt.
            per_request[self.attribution] = orjson.dumps({
                "tenant_id": call.principal.tenant_id, "key_id": call.principal.key_id,
                "request_id": call.request_id}).decode()
        out_headers = merge_headers(forwarded_headers(headers.items()), route.target.headers, per_request)
        route.adapter.tag_tenant(call.endpoint, call.body, self.tenant_tags.tag(
            route.target.provider, call.principal.tenant_id), route.tenant_fields)
        request = route.adapter.prepare(route.target, call.endpoint, call.body, stream, out_headers)
        resp = await route.transport.send(request)
        call.upstream_status = resp.status
        if not 200 <= resp.status < 300:
            raise await self._upstream_failure(route, resp)
        if stream:
            # The whole call, the client's reading included, ends request_timeout after it began.
            deadline = asyncio.get_running_loop().time() + self.request_timeout - (time.perf_counter() - call.started)
            relay = Relay(resp, route.adapter.meter(route.target, strip_usage=not wants_usage),
                          _stream_headers(resp), route.adapter.error_event, route.secrets,
                          lambda end: self._stream_ended(call, end), deadline, self.relay_limits)
            await relay(scope, receive, send)
            return
        try:
            raw = await resp.read()
        except BaseException:
            resp.close()
            raise
        resp.release()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise UpstreamError("The model provider returned a response that is not a JSON object.",
                                code="upstream_invalid_response")
        try:
            usage = route.adapter.read_response(route.target, data)
        except InvalidUsage as exc:
            usage = self._invalid_usage(call, exc, text_bytes_of(data, _TEXT_KEYS))
        if usage is None:
            usage = self._estimate(call, text_bytes_of(data, _TEXT_KEYS))
        charge = self._settle_at_once(call, usage)
        if charge is None:
            charge = await shielded(self._settle(call, usage))
        body = orjson.dumps(data)
        out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if charge is not None:
            out.append((b"x-tollway-cost-usd", format_usd(charge).encode()))
        out += [(k.encode(), v.encode()) for k, v in returned_headers(resp.headers).items() if k != "content-type"]
        await send({"type": "http.response.start", "status": 200, "headers": out})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _upstream_failure(self, route: Route, resp: UpstreamResponse) -> TollwayError:
        status = resp.status
        raw = b""
        try:
            while len(raw) < ERROR_BODY_CAP:
                part = await resp.chunk()
                if not part:
                    break
                raw += part
        except UpstreamError:
            pass
        finally:
            resp.close()
        message, code, param = upstream_error_details(raw[:ERROR_BODY_CAP])
        t = route.target
        message = scrub(message.replace(t.upstream_model, t.slug), route.secrets)
        code, param = scrub_identifier(code, route.secrets), scrub_identifier(param, route.secrets)
        retry = {k: v for k, v in returned_headers(resp.headers).items() if k.startswith("retry-after")}
        if status == 429:
            return UpstreamRateLimited(f"The model provider is rate limiting requests: {message}", headers=retry)
        if status in (400, 422):
            return BadRequest(f"The model provider rejected the request: {message}",
                              code=code or "upstream_bad_request", param=param)
        if status == 413:
            return PayloadTooLarge(f"The model provider rejected the request as too large: {message}")
        if status in (401, 403):
            # The operator's credentials, not the customer's key: say so, quote nothing.
            return UpstreamError(f"The model provider refused this gateway's credentials (HTTP {status}); this is "
                                 f"a gateway configuration problem, not a problem with your API key.",
                                 code="upstream_auth_failed")
        if status in (408, 504):
            return UpstreamTimeout(f"The model provider timed out (HTTP {status}): {message}")
        return UpstreamError(f"The model provider failed (HTTP {status}): {message}", headers=retry)

    # --- settle and record --------------------------------------------------------------------

    def _estimate(self, call: Call, completion_text_bytes: int, known: Usage | None = None) -> Usage:
        prompt = known.prompt_tokens if known and known.prompt_tokens else estimate_prompt_tokens(call.body)
        completion = max(known.completion_tokens if known else 0, tokens_from_bytes(completion_text_bytes))
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     cached_tokens=known.cached_tokens if known else 0,
                     cache_write_tokens=known.cache_write_tokens if known else 0, estimated=True)

    async def _stream_ended(self, call: Call, end: StreamEnd) -> None:
        usage = end.meter.usage()
        if end.meter.invalid is not None:
            usage = self._invalid_usage(call, end.meter.invalid, end.meter.text_bytes)
        elif end.client_gone or end.timed_out or (end.error is not None and end.error.instance_code in _GATEWAY_CUTS):
            if usage is None or usage.estimated or not end.complete:  # the provider's final count, or the rule
                usage = conservative_usage(call.route.model if call.route else None, call.body, call.prompt_bound,
                                           call.output_bound, end.meter.text_bytes, usage)
        elif usage is None or usage.estimated:
            usage = self._estimate(call, end.meter.text_bytes, usage)
        if end.client_gone:
            call.status, call.error_type = 499, "client_disconnected"
        elif end.timed_out:
            call.error_type, call.error_code = "StreamDeadline", "stream_deadline"
        elif end.error is not None:
            call.error_type, call.error_code = type(end.error).__name__, end.error.instance_code
        await self._settle(call, usage)

    def _invalid_usage(self, call: Call, exc: InvalidUsage, completion_text_bytes: int) -> Usage:
        """A usage report with a count out of bounds (base.count): the answer, delivered, is
        charged its reservation, the most it could cost; its row keeps the estimate of its
        tokens, flagged (docs/proxy.md)."""
        call.error_type, call.error_code, call.charge_reserved = type(exc).__name__, exc.instance_code, True
        log.warning("upstream_invalid_usage", request_id=call.request_id, error_code=exc.instance_code,
                    provider=call.route.target.provider if call.route else None)
        return self._estimate(call, completion_text_bytes)

    def _charge_and_row(self, call: Call, usage: Usage | None) -> tuple[int, dict[str, Any]]:
        """What the settle charges (0: a release) and the usage row it writes."""
        assert call.principal is not None and call.route is not None
        route = call.route
        charge = call.reserved if call.charge_reserved else cost(usage, route.prices) if usage is not None else 0
        u = usage or Usage()
        row = {"key_id": call.principal.key_id, "model": route.target.slug, "provider": route.target.provider,
               "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
               "cached_tokens": u.cached_tokens, "reasoning_tokens": u.reasoning_tokens,
               "estimated": u.estimated, "status": call.status, "error_type": call.error_type,
               "latency_ms": int((time.perf_counter() - call.started) * 1000)}
        return charge, row

    def _settle_at_once(self, call: Call, usage: Usage | None) -> int | None:
        """`_settle` within this step of the loop where the ledger can do it so (a hold in
        memory, journaled: Ledger.settle_at_once), so it needs no shield: nothing can cancel
        a call that does not await. Returns what was charged, or None if nothing was done
        and `_settle` must run."""
        if call.settled:
            return None
        charge, row = self._charge_and_row(call, usage)
        try:
            settled = self.svc.ledger.settle_at_once(call.request_id, charge, usage=row)
        except Exception:
            return None  # nothing was charged; `_settle` retries it and logs what fails
        if settled is None:
            return None
        call.settled = True
        self._record(call, usage, settled)
        return settled

    async def _settle(self, call: Call, usage: Usage | None) -> int | None:
        """Charge (or release, usage None) the reservation; write the usage row; log."""
        if call.settled:
            return None
        call.settled = True
        charge, row = self._charge_and_row(call, usage)
        try:
            # A database restart must not turn an answered request into a free one: settle
            # is idempotent (the reservation row, or the hold in memory, is the gate), so retry until it is back.
            settled = await retry_while_unavailable(
                lambda: self.svc.ledger.settle(call.request_id, charge, usage=row), within=SETTLE_RETRY_SECONDS)
        except Exception:
            # The reservation stays; the sweep releases it in full (ledger/transactions.py policy).
            log.error("settle_failed", request_id=call.request_id, exc_info=True)
            self._record(call, usage, None)
            return None
        self._record(call, usage, settled)
        return settled

    def _record(self, call: Call, usage: Usage | None, charged: int | None) -> None:
        call.recorded = True
        p, r = call.principal, call.route
        u = usage or Usage()
        if p is not None and usage is not None:
            self.limiter.used(p, u.prompt_tokens + u.completion_tokens)  # tokens per minute, as billed
        record_request(
            request_id=call.request_id, tenant_id=p.tenant_id if p else None, key_id=p.key_id if p else None,
            model=r.target.slug if r else None, provider=r.target.provider if r else None,
            method="POST", path=_ENDPOINT_OF[call.endpoint], stream=call.stream, status=call.status,
            error_type=call.error_type, error_code=call.error_code, upstream_status=call.upstream_status,
            prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens,
            reasoning_tokens=u.reasoning_tokens, estimated=u.estimated, cost_micros=charged,
            cost_usd=format_usd(charged) if charged is not None else None,
            latency_ms=int((time.perf_counter() - call.started) * 1000))


def _stream_headers(resp: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    out = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
           # Tell a buffering reverse proxy (nginx) in front of Tollway to pass bytes on at once.
           (b"x-accel-buffering", b"no")]
    out += [(k.encode(), v.encode()) for k, v in returned_headers(resp.headers).items() if k != "content-type"]
    return out
