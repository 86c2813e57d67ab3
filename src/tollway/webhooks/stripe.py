"""Stripe top-ups: a Checkout Session to pay, a signature-verified webhook to credit.

Stripe holds card data; Tollway never does. A wallet moves only on a webhook whose
`Stripe-Signature` verifies with stripe-python's own check (HMAC-SHA256 of "t.body"
under the endpoint secret, timestamps older than the configured tolerance refused).
The success page is never trusted: it may not load, and anyone can open it.

Exactly-once, in one write transaction per event:
  * `stripe_events.id` (the evt_ id) is a primary key: a redelivery finds its row and
    changes nothing. On PostgreSQL a concurrent delivery blocks on that key until the
    first commits, then fails with IntegrityError; the transaction rolled back whole,
    so it is run again, finds the row and answers "duplicate".
  * ledger entry ids are business keys, so two different events about one payment act
    once: "stripe:topup:<cs_>" (completed + async_payment_succeeded), "stripe:refund:
    <ch_>:<cumulative refunded>", "stripe:dispute:<dp_>", "stripe:dispute-won:<dp_>".
  * events about one top-up lock its `topups` row first (lock order: event row, top-up
    row, wallet row, everywhere), so they queue instead of racing.

Policies (docs/stripe.md): refunds debit the refunded delta, never below zero, the
shortfall recorded; a dispute debits its amount when opened and re-credits what was
debited if it closes won, warning_closed or prevented (stripe_refunds.py, which also
says how a refund or dispute finds its top-up); a currency other than the configured
one is refused and recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc
import stripe
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tollway.config import ConfigError, StripeConfig, resolve_secret
from tollway.errors import BadRequest, NotFound, PayloadTooLarge, ServiceUnavailable, UpstreamError
from tollway.ledger.transactions import Ledger
from tollway.money import (
    MAX_OPERATOR_MICROS,
    MICROS_PER_USD,
    MoneyError,
    decimal_to_micros_ceil,
    format_usd,
    from_minor_units,
    parse_usd,
)
from tollway.store.db import Store, now_ms
from tollway.store.schema import stripe_events, tenants, topups
from tollway.telemetry import log
from tollway.webhooks import stripe_refunds
from tollway.webhooks.stripe_refunds import intent_of, stripe_id

TENANT_META = "tollway_tenant_id"  # metadata key on the session and its PaymentIntent
MAX_EVENT_BYTES = 1 << 20          # Stripe events are a few kB; refuse anything absurd
SESSION_EVENTS = frozenset({"checkout.session.completed", "checkout.session.async_payment_succeeded",
                            "checkout.session.async_payment_failed", "checkout.session.expired"})
# The object each event used must carry: an event about anything else acts on nothing.
EVENT_OBJECTS = {**dict.fromkeys(SESSION_EVENTS, "checkout.session"), "charge.refunded": "charge",
                 "charge.dispute.created": "dispute", "charge.dispute.closed": "dispute"}
# Stripe's zero- and three-decimal currencies (docs.stripe.com/currencies).
_ZERO_DECIMAL = frozenset({"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd",
                           "vuv", "xaf", "xof", "xpf"})
_THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})


def minor_unit_exponent(currency: str) -> int:
    c = currency.lower()
    return 0 if c in _ZERO_DECIMAL else 3 if c in _THREE_DECIMAL else 2


class _HTTPXClient(stripe.HTTPXClient):
    """stripe-python's httpx client, sending the form body as `content=`: it passes a
    str as `data=`, which httpx deprecates with a warning on every request."""

    async def request_async(self, method: str, url: str, headers: Mapping[str, str],
                            post_data: Any = None) -> tuple[bytes, int, Mapping[str, str]]:
        try:
            resp = await self._client_async.request(method, url, headers=headers, content=post_data,
                                                    timeout=self._timeout)
        except Exception as exc:
            self._handle_request_error(exc)  # -> stripe.APIConnectionError, retried by the library
        return resp.content, resp.status_code, resp.headers

    async def close_async(self) -> None:
        await self._client_async.aclose()


class Payments:
    """Checkout sessions and the webhook for one process. The Stripe client (one pooled
    async HTTP client) is built on first use, so the CLI never opens it."""

    def __init__(self, cfg: StripeConfig, store: Store, ledger: Ledger, source: str) -> None:
        self.cfg = cfg
        self.store = store
        self.ledger = ledger
        self.source = source
        self.currency = cfg.currency.lower()
        self.exponent = minor_unit_exponent(self.currency)
        self.step: int = 10 ** (6 - self.exponent)  # micro-units per minor unit (cents: 10_000)
        self._stripe: stripe.StripeClient | None = None
        self._http: _HTTPXClient | None = None
        self._insert: Any = sqlite.insert if store.is_sqlite else postgresql.insert

    def secrets(self) -> tuple[str, str]:
        """(secret key, webhook secret); ConfigError naming the env var when one is unset."""
        return (resolve_secret(self.cfg.secret_key_env, path="stripe.secret_key_env", source=self.source).reveal(),
                resolve_secret(self.cfg.webhook_secret_env, path="stripe.webhook_secret_env",
                               source=self.source).reveal())

    def _secret(self, which: int) -> str:
        try:
            return self.secrets()[which]
        except ConfigError:
            raise ServiceUnavailable("Payments are not configured on this gateway.", code="payments_unavailable"
                                     ) from None

    def client(self) -> stripe.StripeClient:
        if self._stripe is None:
            self._http = _HTTPXClient(timeout=30)
            self._stripe = stripe.StripeClient(self._secret(0), base_addresses={"api": self.cfg.api_base},
                                               max_network_retries=2, http_client=self._http)
        return self._stripe

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close_async()
        self._stripe = self._http = None

    def routes(self) -> list[BaseRoute]:
        return [Route("/webhooks/stripe", self.webhook, methods=["POST"])]

    # --- Checkout -----------------------------------------------------------------------------

    async def create_checkout(self, tenant_id: str, amount_micros: int, *,
                              idempotency_key: str | None = None) -> dict[str, Any]:
        """A hosted Checkout page for `amount_micros`; the wallet moves only on the webhook."""
        lo = decimal_to_micros_ceil(self.cfg.min_topup_usd)
        hi = int(self.cfg.max_topup_usd * MICROS_PER_USD)
        if not lo <= amount_micros <= hi:
            raise BadRequest(f"amount_usd must be between {format_usd(lo)} and {format_usd(hi)}.",
                             param="amount_usd", code="amount_out_of_range")
        if amount_micros % self.step:
            raise BadRequest(f"amount_usd must be a whole number of {self.currency} minor units.",
                             param="amount_usd", code="invalid_amount")
        async with self.store.read() as conn:
            row = (await conn.execute(sa.select(tenants.c.deleted_at).where(tenants.c.id == tenant_id))).first()
        if row is None or row.deleted_at is not None:
            raise NotFound(f"no tenant {tenant_id}")
        options: stripe.RequestOptions = {}
        if idempotency_key:
            # Stripe answers a repeated key with the same session: a double click pays once.
            options["idempotency_key"] = f"tollway-topup-{tenant_id}-{idempotency_key}"
        try:
            session = await self.client().v1.checkout.sessions.create_async(params={
                "mode": "payment",
                "line_items": [{"quantity": 1, "price_data": {
                    "currency": self.currency, "unit_amount": amount_micros // self.step,
                    "product_data": {"name": "API credit top-up"}}}],
                "client_reference_id": tenant_id,
                "metadata": {TENANT_META: tenant_id},
                # Session metadata does not reach the PaymentIntent; refunds and disputes
                # are matched through the payment_intent stored on fulfilment.
                "payment_intent_data": {"metadata": {TENANT_META: tenant_id}},
                "success_url": self.cfg.success_url,
                "cancel_url": self.cfg.cancel_url,
            }, options=options)
        except stripe.StripeError as exc:
            # Stripe's own message may quote part of the secret key: say only what kind of error.
            log.warning("stripe_checkout_failed", tenant_id=tenant_id, error_type=type(exc).__name__,
                        upstream_status=exc.http_status)
            raise UpstreamError(f"Stripe did not create the checkout session ({type(exc).__name__}); "
                                "retry shortly.", code="payment_provider_error") from None
        if not session.id or not session.url:
            raise UpstreamError("Stripe returned a checkout session without a URL.", code="payment_provider_error")
        async with self.store.write() as conn:
            await conn.execute(self._insert(topups).values(
                session_id=session.id, tenant_id=tenant_id, amount_micros=amount_micros, currency=self.currency,
                status="created", created_at=now_ms()).on_conflict_do_nothing(index_elements=["session_id"]))
        return {"session_id": session.id, "checkout_url": session.url, "amount_usd": format_usd(amount_micros),
                "currency": self.currency}

    # --- the webhook ----------------------------------------------------------------------------

    async def webhook(self, request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_EVENT_BYTES:
                raise PayloadTooLarge("Webhook body too large.")
        return JSONResponse({"received": True, **await self.handle(bytes(body),
                                                                   request.headers.get("stripe-signature"))})

    async def handle(self, payload: bytes, signature: str | None) -> dict[str, str]:
        """Verify, then apply once. Raises BadRequest (400, nothing changed) when the
        signature is missing, forged, for another secret or older than the tolerance."""
        try:
            event = stripe.Webhook.construct_event(payload, signature, self._secret(1),
                                                   tolerance=self.cfg.webhook_tolerance_seconds)
            data = event.to_dict()
            event_id, etype, obj = str(data["id"]), str(data["type"]), data["data"]["object"]
            if not isinstance(obj, dict) or not 0 < len(event_id) <= 120:
                raise TypeError("data.object")
        except stripe.SignatureVerificationError:
            log.warning("stripe_webhook_rejected", error_code="invalid_signature")
            raise BadRequest("Stripe-Signature is missing, invalid or too old.", code="invalid_signature") from None
        except (ValueError, TypeError, KeyError, AttributeError):
            raise BadRequest("The body is not a Stripe event.", code="invalid_event") from None
        resolved = await stripe_refunds.resolve_session(self, event_id, etype, obj)
        for _ in range(5):
            try:
                async with self.store.write() as conn:
                    seen = (await conn.execute(sa.select(stripe_events.c.id)
                                               .where(stripe_events.c.id == event_id))).first()
                    if seen is not None:
                        outcome = "duplicate"
                    else:
                        await conn.execute(stripe_events.insert().values(
                            id=event_id, type=etype[:80], outcome="processing", received_at=now_ms()))
                        outcome = (await self._apply(conn, etype, obj, resolved))[:200]
                        await conn.execute(stripe_events.update().where(stripe_events.c.id == event_id)
                                           .values(outcome=outcome))
            except sa.exc.IntegrityError:
                continue  # a concurrent transaction committed the same key first: look again
            log.info("stripe_webhook", stripe_event_id=event_id, stripe_event_type=etype, outcome=outcome)
            return {"event_id": event_id, "type": etype, "outcome": outcome}
        raise ServiceUnavailable("Webhook contention; Stripe will retry.", code="webhook_busy")

    async def _apply(self, conn: AsyncConnection, etype: str, obj: dict[str, Any],
                     resolved: dict[str, Any] | None) -> str:
        kind = EVENT_OBJECTS.get(etype)
        if kind is None:
            return "ignored: event type not used"
        if obj.get("object") != kind:
            return f"ignored: {etype} about a {str(obj.get('object'))[:40]}, not a {kind}"
        if etype in SESSION_EVENTS:
            return await self._session_event(conn, etype, obj)
        if etype == "charge.refunded":
            return await stripe_refunds.refund(self, conn, obj, resolved)
        return await stripe_refunds.dispute(self, conn, etype, obj, resolved)

    async def adopt(self, conn: AsyncConnection, session: dict[str, Any]) -> dict[str, Any] | None:
        """A session created by us (our metadata) whose row was never written, e.g. a crash
        right after Stripe answered: its top-up row now. None: not ours."""
        session_id = stripe_id(session.get("id"), "cs_")
        tenant_id = (session.get("metadata") or {}).get(TENANT_META)
        if session_id is None or not isinstance(tenant_id, str) or not 0 < len(tenant_id) <= 40 or (
                session.get("mode") != "payment"):
            return None  # 40: the tenant id column; a longer one is no tenant of ours
        await conn.execute(topups.insert().values(
            session_id=session_id, tenant_id=str(tenant_id), amount_micros=0,
            currency=str(session.get("currency") or ""), status="created", created_at=now_ms()))
        return await self.topup(conn, topups.c.session_id == session_id)

    async def _session_event(self, conn: AsyncConnection, etype: str, obj: dict[str, Any]) -> str:
        session_id = stripe_id(obj.get("id"), "cs_")
        if session_id is None:
            return "ignored: session without an id"
        topup = await self.topup(conn, topups.c.session_id == session_id) or await self.adopt(conn, obj)
        if topup is None:
            return "ignored: not a Tollway top-up"
        if etype == "checkout.session.expired":
            if topup["status"] in ("created", "pending"):
                await self.set(conn, session_id, status="expired")
            return "expired"
        if (refused := await self.check_currency(conn, obj, session_id)) is not None:
            return refused
        paid = etype == "checkout.session.async_payment_succeeded" or (
            etype == "checkout.session.completed" and obj.get("payment_status") == "paid")
        intent = intent_of(obj)
        if etype == "checkout.session.async_payment_failed":
            if topup["status"] != "paid":
                await self.set(conn, session_id, status="failed", payment_intent=intent)
            return "failed: asynchronous payment failed"
        if not paid:
            if etype == "checkout.session.completed" and obj.get("payment_status") == "unpaid":
                await self.set(conn, session_id, status="pending", payment_intent=intent)
                return "pending: awaiting asynchronous payment"
            return f"ignored: {etype} without payment"
        amount = self.micros(obj.get("amount_total"))
        await self.set(conn, session_id, status="paid", payment_intent=intent, amount_micros=amount)
        # A refund recorded before this credit (events are not ordered) is netted here.
        net = amount - int(topup["refunded_micros"])
        if net <= 0:
            return "nothing credited: amount is zero or already refunded"
        try:
            res = await self.ledger.credit(topup["tenant_id"], net, f"stripe:topup:{session_id}", kind="topup",
                                           reference=session_id, conn=conn)
        except NotFound:
            return f"refused: tenant {topup['tenant_id']} has no wallet"
        if not res["applied"]:
            return "already credited"
        return f"credited {format_usd(net)} to {topup['tenant_id']}"

    # --- helpers ------------------------------------------------------------------------------

    def micros(self, minor: Any) -> int:
        if isinstance(minor, bool) or not isinstance(minor, int) or minor < 0:
            raise BadRequest("Stripe event amount is not a non-negative integer.", code="invalid_event")
        micros = from_minor_units(minor, self.exponent)  # exact: integer minor units -> micro-units
        if micros > MAX_OPERATOR_MICROS:  # far above any Stripe charge; a wallet could not hold it
            raise BadRequest("Stripe event amount is out of range.", code="invalid_event")
        return micros

    async def check_currency(self, conn: AsyncConnection, obj: dict[str, Any], session_id: str | None) -> str | None:
        currency = str(obj.get("currency") or "").lower()
        if currency == self.currency:
            return None
        if session_id is not None:
            await self.set(conn, session_id, status="refused")
        log.warning("stripe_currency_refused", outcome=f"currency {currency} is not {self.currency}")
        return f"refused: currency {currency or '(none)'} is not {self.currency}"

    async def topup(self, conn: AsyncConnection, where: Any) -> dict[str, Any] | None:
        q = sa.select(topups).where(where).limit(1)
        if not self.store.is_sqlite:
            q = q.with_for_update()  # SQLite already holds its single write lock
        row = (await conn.execute(q)).mappings().first()
        return dict(row) if row is not None else None

    async def set(self, conn: AsyncConnection, session_id: str, **values: Any) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        await conn.execute(topups.update().where(topups.c.session_id == session_id).values(**values))


def payments(configured: Payments | None) -> Payments:
    if configured is None:
        raise NotFound("Stripe top-ups are off (no [stripe] table in the config).", code="payments_disabled")
    return configured


async def start_topup(configured: Payments | None, tenant_id: str, amount_usd: str, *,
                      idempotency_key: str | None = None) -> dict[str, Any]:
    """The admin API's and the dashboard's way to begin a top-up: {"checkout_url", "session_id", ...}."""
    try:
        amount = parse_usd(amount_usd)
    except MoneyError as exc:
        raise BadRequest(f"amount_usd: {exc}", param="amount_usd") from None
    return await payments(configured).create_checkout(tenant_id, amount, idempotency_key=idempotency_key)


def stripe_routes(p: Payments | None) -> list[BaseRoute]:
    """The webhook route when [stripe] is configured (`Services.payments`). Checked at
    startup, so a missing secret is one line from `tollway serve` rather than a failed
    payment later."""
    if p is None:
        return []
    p.secrets()
    if p.cfg.webhook_tolerance_seconds <= 0:
        # stripe-python skips the timestamp check for 0: captured events could be replayed forever.
        raise ConfigError(f"{p.source}: stripe.webhook_tolerance_seconds: expected a positive number of seconds")
    if len(p.currency) != 3 or not p.currency.isalpha():
        raise ConfigError(f"{p.source}: stripe.currency: expected a three-letter ISO code such as \"usd\"")
    return p.routes()
