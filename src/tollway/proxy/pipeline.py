"""The one place that orders a /v1 call:
authenticate -> read -> resolve -> reserve -> forward -> meter -> settle -> record.
Forward: an attempt that failed before any byte reached the client is retried, then the
model's fallbacks are tried (`_recover`; when and how long: retry.py).

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
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

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
    RESPONSES,
    Adapter,
    InvalidUsage,
    Target,
    Transport,
    UpstreamRequest,
    UpstreamResponse,
    estimate_prompt_tokens,
    merge_headers,
    text_bytes_of,
    tokens_from_bytes,
    upstream_error_details,
)
from tollway.providers.echo import EchoTransport
from tollway.providers.responses import ResponsesAdapter, serves_responses
from tollway.providers.tenant_tag import TenantTagger, resolve_fields
from tollway.providers.translate import Translation, translation_for
from tollway.proxy.disconnect import conservative_usage
from tollway.proxy.inbound import ClientGone, header_map, model_slug, parse_json, read_body, shape, widen
from tollway.proxy.relay import SHUTDOWN_MESSAGE, Ending, Relay, RelayLimits, ShuttingDown, StreamEnd, shielded
from tollway.proxy.retry import RetryPolicy, moves_on, pause, retry_after, retryable, should_retry
from tollway.proxy.streams import StreamSlots
from tollway.proxy.upstream import Upstream, json_object
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
                "embeddings": "/v1/embeddings", "messages": "/v1/messages", "responses": "/v1/responses"}


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
    fallbacks: tuple[Route, ...] = ()  # tried in order after it failed before answering (retry.py)
    # x-tollway-model (its slug) and x-tollway-attempts: 1, the headers of an answer it gave at once
    served: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Candidate:
    """A model that may serve a call with fallbacks: its own copy of the body, shaped and
    bounded for it (its output bound, its upstream name), and that bound's prompt/output tokens."""

    route: Route
    body: dict[str, Any]
    prompt_bound: int
    output_bound: int
    translation: Translation | None  # its provider's wire format is not the client's
    upstream_body: dict[str, Any]  # `body`, or its translation


class Call:
    """One request's facts, for the settle, the usage row and the log line."""

    __slots__ = ("attempts", "body", "charge_reserved", "endpoint", "error_code", "error_type", "output_bound",
                 "plan", "principal", "prompt_bound", "recorded", "request_id", "requested", "reserved", "route",
                 "settled", "started", "status", "stream", "translation", "upstream_body", "upstream_status")

    def __init__(self, request_id: str, endpoint: str) -> None:
        self.request_id = request_id
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.principal: Principal | None = None
        self.route: Route | None = None
        self.body: dict[str, Any] = {}
        self.translation: Translation | None = None  # the client's format is not the provider's
        self.upstream_body: dict[str, Any] = self.body  # what the provider gets (translated, or the body)
        self.stream = False
        self.status = 200
        self.error_type: str | None = None
        self.error_code: str | None = None
        self.upstream_status: int | None = None
        self.settled = False
        self.recorded = False
        self.reserved = 0
        self.charge_reserved = False  # the provider's usage report was refused (`_invalid_usage`)
        self.prompt_bound = 0  # the serving model's bounds: tokens of prompt and of output
        self.output_bound = 0
        self.requested: str | None = None  # the model the client asked for; route: the one serving
        self.attempts = 1  # upstream requests sent, retries and fallbacks included
        self.plan: list[Candidate] | None = None  # only for a model with fallbacks

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
        served = ((b"x-tollway-model", quote(m.id, safe="/:@.-_+").encode()), (b"x-tollway-attempts", b"1"))
        routes[m.id] = Route(target, m, adapter, transport, prices, tuple(s for s in (key, cf_token) if s),
                             resolve_fields(provider), served=served)
    # A fallback's own fallbacks are not followed: config.py checked each list.
    return {slug: dataclasses.replace(r, fallbacks=tuple(routes[f] for f in r.model.fallbacks)) if r.model.fallbacks
            else r for slug, r in routes.items()}


class Pipeline:
    def __init__(self, svc: Services, provider_keys: dict[str, Any]) -> None:
        cfg = svc.config
        self.svc = svc
        self.max_body = cfg.server.max_body_bytes
        self.max_response = cfg.server.max_response_bytes
        self.attribution = cfg.attribution.header.lower() if cfg.attribution else None
        self.upstream = Upstream(cfg.server.request_timeout_seconds, cfg.server.stream_idle_timeout_seconds)
        self.request_timeout = cfg.server.request_timeout_seconds
        self.relay_limits = RelayLimits(cfg.server.disconnect_drain_seconds, cfg.server.disconnect_drain_bytes)
        self.retry = RetryPolicy(cfg.server.retry_attempts, cfg.server.retry_backoff_ms / 1000,
                                 cfg.server.retry_after_cap_seconds)
        self.live = svc.ledger.live
        self.routes = build_routes(cfg, provider_keys, self.upstream, EchoTransport())
        # /v1/responses: the same routes with the Responses adapter, for the providers that serve it.
        responses = ResponsesAdapter()
        self.responses = {slug: dataclasses.replace(r, adapter=responses) for slug, r in self.routes.items()
                          if serves_responses(cfg.providers[r.target.provider])}
        self.tenant_tags = TenantTagger(svc.keys.secret)
        self.streams = StreamSlots(cfg.server.max_streams_per_key)
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
            await render_json(exc, call.request_id, anthropic=endpoint == MESSAGES)(scope, receive, send)
        except asyncio.CancelledError:
            # The server's drain deadline (serving.py): a call not answered yet gets a 503.
            if call.settled and call.status != ShuttingDown.status:
                raise  # answered, or a stream (the relay ends its own)
            await self._shut_out(call, scope, receive, send)
        finally:
            self.live.discard(call.request_id)
            if call.stream:
                self.streams.give_back(call.request_id)

    async def _serve(self, call: Call, state: dict[str, Any], scope: Scope, receive: Receive, send: Send) -> None:
        headers = header_map(scope)
        call.principal = principal = await self.svc.keys.authenticate(bearer_key(headers))
        state["tenant_id"] = principal.tenant_id
        await self.limiter.admit(principal, state)  # 429 here forwards and reserves nothing
        raw = await read_body(receive, headers, self.max_body)
        call.body = body = parse_json(raw)
        call.route = route = self._resolve(call.endpoint, model_slug(body))
        call.requested = route.target.slug
        sh = shape(call.endpoint, body, len(raw), route.model, headers, route.target.output_field)
        call.stream = sh.stream
        call.prompt_bound, call.output_bound = sh.prompt_bound, sh.completion_bound
        # Checked and bounded in the client's format (shape); refused here if it cannot map.
        call.translation = translation_for(call.endpoint, route.adapter.endpoints)
        call.upstream_body, call.prompt_bound = _translated(call.translation, body, sh.prompt_bound, len(raw), route)
        if sh.stream:
            self.streams.take(principal.key_id, call.request_id)  # 429 past server.max_streams_per_key
        if route.fallbacks:
            route = self._plan(call, raw, headers)
        elif route.transport is None:
            raise ServiceUnavailable(f"The model '{route.target.slug}' is not available right now: its provider "
                                     f"has no key configured on this gateway.")
        else:
            call.reserved = max_cost(call.prompt_bound, sh.completion_bound, route.prices)
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
                if isinstance(exc, TollwayError | asyncio.CancelledError):
                    call.failed(exc if isinstance(exc, TollwayError) else ShuttingDown(SHUTDOWN_MESSAGE))
                else:
                    call.status, call.error_type = 500, type(exc).__name__
                await shielded(self._settle(call, None))
            raise

    def _plan(self, call: Call, raw: bytes, headers: dict[str, str]) -> Route:
        """The candidates of a model with fallbacks, each with its own body shaped for it,
        and the reservation: the most the most expensive of them can cost. Returns the first."""
        route = call.route
        assert route is not None
        plan = [Candidate(route, call.body, call.prompt_bound, call.output_bound, call.translation,
                          call.upstream_body)] if route.transport else []
        for listed in route.fallbacks:
            # /v1/responses: a fallback serves it only through its Responses route, if its provider has one.
            fb = self.responses.get(listed.target.slug) if call.endpoint == RESPONSES else listed
            if fb is None or fb.transport is None:
                continue
            body = orjson.loads(raw)  # a fresh copy: shape and tag_tenant patch it for this model
            tr = translation_for(call.endpoint, fb.adapter.endpoints)
            if tr is None and call.endpoint not in fb.adapter.endpoints:
                continue  # neither served nor translated there (legacy completions on a Messages model)
            try:
                sh = shape(call.endpoint, body, len(raw), fb.model, headers, fb.target.output_field)
                upstream_body, prompt_bound = _translated(tr, body, sh.prompt_bound, len(raw), fb)
            except BadRequest:
                continue  # this model cannot take this request (an image and no context window)
            plan.append(Candidate(fb, body, prompt_bound, sh.completion_bound, tr, upstream_body))
        if not plan:
            raise ServiceUnavailable(f"The model '{route.target.slug}' is not available right now: its provider "
                                     f"and those of its fallbacks have no key configured on this gateway.")
        call.plan = plan
        call.reserved = max(max_cost(c.prompt_bound, c.output_bound, c.route.prices) for c in plan)
        return self._switch(call, plan[0])

    @staticmethod
    def _switch(call: Call, c: Candidate) -> Route:
        call.route, call.body, call.prompt_bound, call.output_bound = c.route, c.body, c.prompt_bound, c.output_bound
        call.translation, call.upstream_body = c.translation, c.upstream_body
        return c.route

    async def _shut_out(self, call: Call, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        while task is not None and task.uncancel():
            pass
        exc = ShuttingDown(SHUTDOWN_MESSAGE)
        if not call.recorded:
            call.failed(exc)
            self._record(call, None, None)
        await render_json(exc, call.request_id, anthropic=call.endpoint == MESSAGES)(scope, receive, send)

    def _resolve(self, endpoint: str, slug: str) -> Route:
        # A model whose provider does not serve the Responses API gets its plain route: the
        # endpoint check below names the endpoint to call instead.
        route = (endpoint == RESPONSES and self.responses.get(slug)) or self.routes.get(slug)
        if route is None:
            raise ModelNotFound(f"The model '{slug[:200]}' does not exist or you do not have access to it.",
                                param="model")
        kind = route.model.kind
        if (kind == "embedding") != (endpoint == EMBEDDINGS):
            where = "POST /v1/embeddings" if kind == "embedding" else "a generation endpoint"
            raise BadRequest(f"The model '{slug}' is a {kind} model; call {where}.", param="model")
        if endpoint not in route.adapter.endpoints and translation_for(endpoint, route.adapter.endpoints) is None:
            where = "POST /v1/messages" if MESSAGES in route.adapter.endpoints else "POST /v1/chat/completions"
            raise BadRequest(f"The model '{slug}' is not served on {_ENDPOINT_OF[endpoint]}; call {where}.",
                             param="model")
        return route

    async def _forward(self, call: Call, route: Route, headers: dict[str, str], stream: bool, wants_usage: bool,
                       scope: Scope, receive: Receive, send: Send) -> None:
        assert route.transport is not None
        request = self._request(call, route, headers)
        try:
            resp = await route.transport.send(request)
        except UpstreamError as exc:
            recovered = await self._recover(call, headers, request, exc, receive)
            if recovered is None:
                return  # the client left while a retry waited: released and recorded
            resp, route = recovered
        else:
            if not 200 <= resp.status < 300:
                recovered = await self._recover(call, headers, request, resp, receive)
                if recovered is None:
                    return
                resp, route = recovered
        call.upstream_status = resp.status
        if stream and not _is_event_stream(resp):
            # An HTML page from a proxy, a JSON body: relayed, it would reach the client as
            # events its SDK cannot read, and be charged as a stream the provider cut.
            resp.close()
            raise UpstreamError("The model provider answered a streaming request with something other than an "
                                "event stream.", code="upstream_invalid_response")
        if stream:
            # The whole call, the client's reading included, ends request_timeout after it began.
            deadline = asyncio.get_running_loop().time() + self.request_timeout - (time.perf_counter() - call.started)
            tr = call.translation
            meter = route.adapter.meter(route.target, strip_usage=not wants_usage or tr is not None)
            error_event: Callable[[TollwayError], bytes] = route.adapter.error_event
            ending: Ending | None = None
            if tr is not None:  # the provider's meter still reads the usage; the client gets its format
                meter = ending = tr.stream(meter, route.target, wants_usage)
                error_event = tr.error_event
            relay = Relay(resp, meter, _stream_headers(resp, route, call.attempts), error_event, route.secrets,
                          lambda end: self._stream_ended(call, end), deadline, self.relay_limits, ending)
            await relay(scope, receive, send)
            return
        data = await json_object(resp, self.max_response)
        try:
            usage = route.adapter.read_response(route.target, data)
        except InvalidUsage as exc:
            usage = self._invalid_usage(call, exc, text_bytes_of(data, _TEXT_KEYS))
        if usage is None:
            usage = self._estimate(call, text_bytes_of(data, _TEXT_KEYS))
        if call.translation is not None:  # before the settle: an answer that cannot be translated is not served
            data = call.translation.response(data, usage, route.target.slug)
        charge = self._settle_at_once(call, usage)
        if charge is None:
            charge = await shielded(self._settle(call, usage))
        body = orjson.dumps(data)
        out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if charge is not None:
            out.append((b"x-tollway-cost-usd", format_usd(charge).encode()))
        out += _served_headers(route, call.attempts)
        out += [(k.encode(), v.encode()) for k, v in returned_headers(resp.headers).items() if k != "content-type"]
        await send({"type": "http.response.start", "status": 200, "headers": out})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _request(self, call: Call, route: Route, headers: dict[str, str]) -> UpstreamRequest:
        """The upstream request for `route` (the call's serving model): its body, and its
        provider's key in its headers only."""
        assert call.principal is not None
        per_request = self.attributed(call.principal, call.request_id)
        client_headers = forwarded_headers(headers.items())
        tr = call.translation
        endpoint = call.endpoint if tr is None else tr.upstream_endpoint
        if tr is not None and tr.drop_headers:
            client_headers = {k: v for k, v in client_headers.items() if k not in tr.drop_headers}
        out_headers = merge_headers(client_headers, route.target.headers, per_request)
        route.adapter.tag_tenant(endpoint, call.upstream_body, self.tenant_tags.tag(
            route.target.provider, call.principal.tenant_id), route.tenant_fields)
        return route.adapter.prepare(route.target, endpoint, call.upstream_body, call.stream, out_headers)

    def attributed(self, principal: Principal, request_id: str) -> dict[str, str]:
        """The per-customer metadata header of every upstream call (config: attribution),
        or nothing when it is not configured."""
        if not self.attribution:
            return {}
        # Flat and at most 5 entries (Cloudflare's limit); ids only, nothing from the prompt.
        return {self.attribution: orjson.dumps({"tenant_id": principal.tenant_id, "key_id": principal.key_id,
                                                "request_id": request_id}).decode()}

    async def _recover(self, call: Call, headers: dict[str, str], request: UpstreamRequest,
                       failure: UpstreamResponse | UpstreamError, receive: Receive
                       ) -> tuple[UpstreamResponse, Route] | None:
        """An attempt failed before any byte reached the client: retry that model, then its
        fallbacks (retry.py), all within the call's request_timeout. Returns the answer that
        came and the model that gave it, None if the client left during a wait (the call is
        then settled), or raises the last failure, mapped and scrubbed with its own
        provider's secrets."""
        deadline = call.started + self.request_timeout
        plan, index, retry = call.plan, 0, 0
        while True:
            route = call.route
            assert route is not None and route.transport is not None
            if isinstance(failure, UpstreamError):  # no answer at all: a connection error or a timeout
                again = onward = True
                after = None
            else:
                call.upstream_status = failure.status
                onward = moves_on(failure.status)
                again = retryable(failure.status) and should_retry(failure.headers)
                after = retry_after(failure.headers) if again else None
            log.warning("upstream_attempt_failed", request_id=call.request_id, model=route.target.slug,
                        provider=route.target.provider, attempts=call.attempts,
                        upstream_status=None if isinstance(failure, UpstreamError) else failure.status,
                        error_code=failure.instance_code if isinstance(failure, UpstreamError) else None)
            delay = self.retry.delay(retry, after) if again else None
            if delay is not None and time.perf_counter() + delay < deadline:
                retry += 1
            elif onward and plan is not None and index + 1 < len(plan):
                index, retry, delay = index + 1, 0, 0.0
            else:
                raise failure if isinstance(failure, UpstreamError) else await self._upstream_failure(route, failure)
            if not isinstance(failure, UpstreamError):
                failure.close()
            if await pause(delay, receive):
                call.status, call.error_type = 499, "client_disconnected"
                await shielded(self._settle(call, None))
                return None
            if retry == 0:  # the next fallback
                assert plan is not None
                route = self._switch(call, plan[index])
                request = self._request(call, route, headers)
            left = deadline - time.perf_counter()
            if left <= 0:
                raise UpstreamTimeout(f"The model provider did not answer within {self.request_timeout:g} seconds.")
            call.attempts += 1
            assert route.transport is not None
            try:
                failure = await route.transport.send(dataclasses.replace(request, timeout=left))
            except UpstreamError as exc:
                failure = exc
                continue
            if 200 <= failure.status < 300:
                return failure, route

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
        elif (end.client_gone or end.timed_out or end.stopped
              or (end.error is not None and end.error.instance_code in _GATEWAY_CUTS)):
            if usage is None or usage.estimated or not end.complete:  # the provider's final count, or the rule
                usage = conservative_usage(call.route.model if call.route else None, call.body, call.prompt_bound,
                                           call.output_bound, end.meter.text_bytes, usage)
        elif usage is None or usage.estimated:
            usage = self._estimate(call, end.meter.text_bytes, usage)
        if end.client_gone:
            call.status, call.error_type = 499, "client_disconnected"
        elif end.stopped:
            call.error_type, call.error_code = "ShuttingDown", ShuttingDown.code
        elif end.timed_out:
            call.error_type, call.error_code = "StreamDeadline", "stream_deadline"
        elif end.error is not None:
            call.error_type, call.error_code = type(end.error).__name__, end.error.instance_code
        end.billed = usage
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
        # Refused usage is charged the most the serving model could cost (the reservation, without fallbacks).
        charge = (max_cost(call.prompt_bound, call.output_bound, route.prices) if call.charge_reserved
                  else cost(usage, route.prices) if usage is not None else 0)
        u = usage or Usage()
        row = {"key_id": call.principal.key_id, "model": route.target.slug, "provider": route.target.provider,
               "requested_model": call.requested, "attempts": call.attempts,
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
            requested_model=call.requested, attempts=call.attempts,
            method="POST", path=_ENDPOINT_OF[call.endpoint], stream=call.stream, status=call.status,
            error_type=call.error_type, error_code=call.error_code, upstream_status=call.upstream_status,
            prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens,
            reasoning_tokens=u.reasoning_tokens, estimated=u.estimated, cost_micros=charged,
            cost_usd=format_usd(charged) if charged is not None else None,
            latency_ms=int((time.perf_counter() - call.started) * 1000))


def _translated(tr: Translation | None, body: dict[str, Any], prompt_bound: int, raw_size: int,
                route: Route) -> tuple[dict[str, Any], int]:
    """The body for `route`'s provider and the prompt bound widened to it when translated
    (the translation may be larger than what the client sent)."""
    if tr is None:
        return body, prompt_bound
    upstream = tr.request(body, route.target)
    return upstream, widen(prompt_bound, len(orjson.dumps(upstream)) - raw_size, route.model)


def _is_event_stream(resp: UpstreamResponse) -> bool:
    """Whether a stream's answer is one: its content-type says text/event-stream, or it
    names none (lenient: some OpenAI-compatible servers omit it)."""
    for name, value in resp.headers:
        if name.lower() == "content-type":
            return value.lower().startswith("text/event-stream")
    return True


def _served_headers(route: Route, attempts: int) -> tuple[tuple[bytes, bytes], ...]:
    """Which model answered (a fallback may have), and after how many upstream requests."""
    if attempts == 1:
        return route.served
    return route.served[0], (b"x-tollway-attempts", str(attempts).encode())


def _stream_headers(resp: UpstreamResponse, route: Route, attempts: int) -> list[tuple[bytes, bytes]]:
    out = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
           # Tell a buffering reverse proxy (nginx) in front of Tollway to pass bytes on at once.
           (b"x-accel-buffering", b"no"), *_served_headers(route, attempts)]
    out += [(k.encode(), v.encode()) for k, v in returned_headers(resp.headers).items() if k != "content-type"]
    return out
