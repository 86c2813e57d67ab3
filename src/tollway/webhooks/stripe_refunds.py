"""Refunds and disputes: which top-up a Stripe charge event is about, and what it does there.

A refund or dispute names its PaymentIntent; Tollway learns a top-up's PaymentIntent from
the session's completion. Two rules make the match safe:
  * A missing, empty or non-PaymentIntent id matches nothing. (`payment_intent == None`
    compiles to IS NULL, which matched every top-up not yet paid, another tenant's too.)
    Such an event is not Tollway's: acknowledged, its outcome recorded.
  * Stripe does not order events: a refund or dispute may come before its checkout's
    completion. When no top-up knows the PaymentIntent, Stripe's API is asked which
    Checkout Session it paid (outside the write transaction, so no lock is held across the
    call); a session of ours gets the PaymentIntent recorded. A refund is then recorded and
    netted from the credit to come; a dispute on a top-up not credited yet is answered 503
    so that Stripe redelivers it after the completion. If Stripe cannot be asked, the
    answer is 503 too and nothing is recorded: Stripe retries for days.
A dispute closed before its `created` arrives applies the opening it implies first, so a
late `created` finds its debit and changes nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

import sqlalchemy as sa
import stripe
from sqlalchemy.ext.asyncio import AsyncConnection

from tollway.errors import ServiceUnavailable
from tollway.ledger.transactions import Ledger
from tollway.money import format_usd
from tollway.store.db import Store
from tollway.store.schema import ledger_entries, stripe_events, topups
from tollway.telemetry import log


class Payments(Protocol):
    """What these functions use of webhooks/stripe.py's `Payments` (stated here, so the two
    modules do not import each other)."""

    store: Store
    ledger: Ledger

    def client(self) -> stripe.StripeClient: ...
    def micros(self, minor: Any) -> int: ...
    async def adopt(self, conn: AsyncConnection, session: dict[str, Any]) -> dict[str, Any] | None: ...
    async def check_currency(self, conn: AsyncConnection, obj: dict[str, Any], session_id: str | None
                             ) -> str | None: ...
    async def topup(self, conn: AsyncConnection, where: Any) -> dict[str, Any] | None: ...
    async def set(self, conn: AsyncConnection, session_id: str, **values: Any) -> None: ...

CHARGE_EVENTS = frozenset({"charge.refunded", "charge.dispute.created", "charge.dispute.closed"})
# Dispute statuses after which the disputed money is back with the merchant
# ("prevented": Stripe refunds instead, and that refund is debited on charge.refunded).
DISPUTE_RETURNED = frozenset({"won", "warning_closed", "prevented"})
NO_INTENT = "ignored: no PaymentIntent, not a Tollway top-up"
NOT_OURS = "ignored: charge is not a Tollway top-up"


def stripe_id(value: Any, prefix: str = "") -> str | None:
    """An id field Stripe sends either as "pi_..." or as the expanded object; None when it
    is missing, empty, not a string, of another object type than `prefix` says, or longer
    than the ledger entry ids built from it can hold (real ids are under 70 characters)."""
    if isinstance(value, dict):
        value = value.get("id")
    if not isinstance(value, str) or not value.startswith(prefix) or len(value) <= len(prefix) or len(value) > 100:
        return None
    return value


def intent_of(obj: dict[str, Any]) -> str | None:
    return stripe_id(obj.get("payment_intent"), "pi_")


async def resolve_session(p: Payments, event_id: str, etype: str, obj: dict[str, Any]) -> dict[str, Any] | None:
    """For a refund or dispute whose PaymentIntent no top-up knows yet: the Checkout Session
    Stripe says it paid ({} for none), else None (nothing to ask)."""
    pi = intent_of(obj) if etype in CHARGE_EVENTS else None
    if pi is None:
        return None
    async with p.store.read() as conn:
        if (await conn.execute(sa.select(stripe_events.c.id).where(stripe_events.c.id == event_id))).first():
            return None  # a redelivery: answered "duplicate" without asking
        if (await conn.execute(sa.select(topups.c.session_id).where(topups.c.payment_intent == pi))).first():
            return None
    try:
        found = await p.client().v1.checkout.sessions.list_async(params={"payment_intent": pi, "limit": 1})
    except stripe.StripeError as exc:
        log.warning("stripe_lookup_failed", error_type=type(exc).__name__, upstream_status=exc.http_status)
        raise ServiceUnavailable("Stripe could not be asked which payment this event is about; Stripe "
                                 "redelivers it.", code="payment_provider_error") from None
    return found.data[0].to_dict() if found.data else {}


async def payment_topup(p: Payments, conn: AsyncConnection, obj: dict[str, Any],
                        resolved: dict[str, Any] | None) -> dict[str, Any] | None:
    """The top-up (locked) whose PaymentIntent `obj` names, or None: not ours."""
    pi = intent_of(obj)
    if pi is None:
        return None
    topup = await p.topup(conn, topups.c.payment_intent == pi)
    if topup is not None or not resolved or intent_of(resolved) != pi:
        return topup
    session_id = stripe_id(resolved.get("id"), "cs_")
    if session_id is None:
        return None
    topup = await p.topup(conn, topups.c.session_id == session_id) or await p.adopt(conn, resolved)
    if topup is None or topup["payment_intent"] not in (None, pi):
        return None
    await p.set(conn, session_id, payment_intent=pi)
    return {**topup, "payment_intent": pi}


async def target(p: Payments, conn: AsyncConnection, obj: dict[str, Any], resolved: dict[str, Any] | None,
                 what: str) -> tuple[str, dict[str, Any]] | str:
    """(the charge's or dispute's id, its top-up), or the outcome saying why it acts on nothing."""
    own_id = stripe_id(obj.get("id"))
    if intent_of(obj) is None:
        return NO_INTENT
    if own_id is None:
        return f"ignored: {what} without an id"
    topup = await payment_topup(p, conn, obj, resolved)
    if topup is None:
        return NOT_OURS
    if (refused := await p.check_currency(conn, obj, None)) is not None:
        return refused
    return own_id, topup


async def refund(p: Payments, conn: AsyncConnection, charge: dict[str, Any], resolved: dict[str, Any] | None) -> str:
    found = await target(p, conn, charge, resolved, "charge")
    if isinstance(found, str):
        return found
    charge_id, topup = found
    cumulative = p.micros(charge.get("amount_refunded"))  # cumulative over all refunds
    delta = cumulative - int(topup["refunded_micros"])
    if delta <= 0:
        return "ignored: refund already applied"
    await p.set(conn, topup["session_id"], refunded_micros=cumulative)
    if topup["status"] != "paid":
        return f"recorded refund of {format_usd(delta)} before credit"
    res = await p.ledger.debit(topup["tenant_id"], delta, f"stripe:refund:{charge_id}:{cumulative}",
                               kind="refund", reference=charge_id, conn=conn)
    return debited("refund", delta, res)


async def dispute(p: Payments, conn: AsyncConnection, etype: str, obj: dict[str, Any],
                  resolved: dict[str, Any] | None) -> str:
    found = await target(p, conn, obj, resolved, "dispute")
    if isinstance(found, str):
        return found
    dispute_id, topup = found
    if topup["status"] in ("created", "pending"):
        # Its completion is still on the way: taken back now, the credit to come would undo it.
        raise ServiceUnavailable("This dispute's payment is not credited yet; Stripe redelivers the event.",
                                 code="payment_not_yet_credited")
    if topup["status"] != "paid":
        return f"ignored: dispute on a top-up never credited ({topup['status']})"
    tenant_id, entry = topup["tenant_id"], f"stripe:dispute:{dispute_id}"
    taken = (await conn.execute(sa.select(ledger_entries.c.amount_micros)
                                .where(ledger_entries.c.id == entry))).scalar()
    opened = ""
    if etype == "charge.dispute.created" or taken is None:
        amount = p.micros(obj.get("amount"))
        if amount <= 0:
            return "ignored: dispute without amount"
        res = await p.ledger.debit(tenant_id, amount, entry, kind="dispute", reference=dispute_id, conn=conn)
        if etype == "charge.dispute.created":
            return debited("dispute", amount, res)
        # Closed before its "created" arrived: the opening it implies, so the late one is a no-op.
        opened = debited("dispute", amount, res) + "; "
        taken = -(amount - int(res["shortfall_micros"]))
    status = str(obj.get("status"))
    if status not in DISPUTE_RETURNED:
        return f"{opened}dispute closed {status}: debit stands"
    if not taken:
        return f"{opened}dispute closed {status}: nothing was debited"
    # Give back what was actually taken, not the disputed amount: a shortfall was never debited.
    res = await p.ledger.credit(tenant_id, -int(taken), f"stripe:dispute-won:{dispute_id}", kind="adjust",
                                reference=dispute_id, conn=conn)
    return opened + (f"re-credited {format_usd(-int(taken))}: dispute {status}" if res["applied"]
                     else "already re-credited")


def debited(what: str, amount: int, res: dict[str, Any]) -> str:
    if not res["applied"]:
        return f"{what} already debited"
    taken = amount - int(res["shortfall_micros"])
    short = f", shortfall {format_usd(res['shortfall_micros'])} not covered by the balance" if taken < amount else ""
    return f"debited {format_usd(taken)} for {what}{short}"
