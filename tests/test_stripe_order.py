"""Stripe events that name no payment, or arrive in another order than the payment's own:
a refund or dispute is never matched on a missing id, and one that comes before its
checkout's completion is matched through Stripe's API (the fake on loopback) or redelivered.
Fixtures and helpers come from test_stripe.py."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from tests.test_bodycap import post_head, push, status_and_json
from tests.test_stripe import (  # noqa: F401 - fixtures
    Gateway,
    charge,
    dispute,
    event,
    fake_stripe,
    gw,
    gw1,
    paid_topup,
    secrets_env,
    session,
)
from tollway.store.schema import stripe_events, topups


async def open_checkout(g: Gateway, tenant_id: str, amount: str = "20.00") -> str:
    r = await g.admin("POST", f"/tenants/{tenant_id}/topups", json={"amount_usd": amount})
    assert r.status_code == 200, r.text
    return str(r.json()["session_id"])


def no_intent(obj: dict[str, Any]) -> dict[str, Any]:
    return {**obj, "payment_intent": None}


# --- missing and foreign ids ------------------------------------------------------------------------


async def test_refund_or_dispute_without_payment_intent_touches_no_tenant(gw: Gateway) -> None:
    victim = await gw.tenant()
    await paid_topup(gw, victim, "20.00")
    sid = await open_checkout(gw, victim, "15.00")  # unpaid: its payment_intent is NULL
    r = await gw.deliver(event("charge.dispute.created", no_intent(dispute("dp_nopi", "pi_x", 1500, "needs_response"))))
    assert r.status_code == 200 and r.json()["outcome"] == "ignored: no PaymentIntent, not a Tollway top-up"
    r = await gw.deliver(event("charge.refunded", no_intent(charge("pi_y", 1500, 1500))))
    assert r.status_code == 200 and r.json()["outcome"] == "ignored: no PaymentIntent, not a Tollway top-up"
    for empty in ("", {"id": None}):
        r = await gw.deliver(event("charge.refunded", {**charge("pi_z", 1500, 1500), "payment_intent": empty}))
        assert r.json()["outcome"] == "ignored: no PaymentIntent, not a Tollway top-up"
    assert await gw.balance(victim) == 20_000_000
    row = next(t for t in await gw.rows(topups) if t["session_id"] == sid)
    assert (row["status"], row["refunded_micros"], row["payment_intent"]) == ("created", 0, None)
    # The open checkout is paid later: all of it is credited, nothing was netted against it.
    r = await gw.deliver(event("checkout.session.completed", session(sid, victim, 1500)))
    assert r.json()["outcome"] == f"credited 15.000000 to {victim}"
    assert await gw.balance(victim) == 35_000_000 and await gw.verify() == []
    assert gw.fake.requests[-1].form.get("payment_intent") is None  # no look-up without an id


async def test_events_with_missing_ids_or_other_object_types_are_ignored(gw1: Gateway) -> None:
    tid = await gw1.tenant()
    _, pi, _ = await paid_topup(gw1, tid, "20.00")
    # No session id, though our metadata: never adopted as a top-up with an empty id.
    r = await gw1.deliver(event("checkout.session.completed", {**session("x", tid, 5000), "id": None}))
    assert r.json()["outcome"].startswith("ignored")
    # A refund event whose object is not a charge, or a charge without an id.
    r = await gw1.deliver(event("charge.refunded", {**charge(pi, 2000), "object": "payment_intent"}))
    assert r.json()["outcome"].startswith("ignored")
    r = await gw1.deliver(event("charge.refunded", {**charge(pi, 2000), "id": None}))
    assert r.json()["outcome"].startswith("ignored")
    r = await gw1.deliver(event("charge.dispute.created", {**dispute("dp_1", pi, 2000, "needs_response"), "id": ""}))
    assert r.json()["outcome"].startswith("ignored")
    # An id of another kind where the PaymentIntent belongs matches nothing.
    r = await gw1.deliver(event("charge.refunded", {**charge(pi, 2000), "payment_intent": "ch_" + pi[3:]}))
    assert r.json()["outcome"].startswith("ignored")
    assert await gw1.balance(tid) == 20_000_000
    assert [t["session_id"] for t in await gw1.rows(topups)] != [""] and all(
        t["session_id"] for t in await gw1.rows(topups))


# --- refunds and disputes before the completion --------------------------------------------------------


async def test_full_refund_before_completion_leaves_nothing_either_order(gw: Gateway) -> None:
    tid = await gw.tenant()
    # Refund first: the PaymentIntent is learnt from Stripe, the refund is netted from the credit.
    sid, pi = await open_checkout(gw, tid), "pi_" + secrets.token_hex(8)
    gw.fake.pay(sid, pi)
    r = await gw.deliver(event("charge.refunded", charge(pi, 2000)))
    assert r.status_code == 200 and r.json()["outcome"] == "recorded refund of 20.000000 before credit"
    r = await gw.deliver(event("checkout.session.completed", session(sid, tid, 2000, pi=pi)))
    assert r.json()["outcome"] == "nothing credited: amount is zero or already refunded"
    assert await gw.balance(tid) == 0
    # Completion first, then the refund: the same end state.
    _, pi2, _ = await paid_topup(gw, tid, "20.00")
    r = await gw.deliver(event("charge.refunded", charge(pi2, 2000)))
    assert r.json()["outcome"] == "debited 20.000000 for refund"
    assert await gw.balance(tid) == 0
    # A partial refund first: only the rest is credited.
    sid3, pi3 = await open_checkout(gw, tid), "pi_" + secrets.token_hex(8)
    gw.fake.pay(sid3, pi3)
    assert (await gw.deliver(event("charge.refunded", charge(pi3, 500)))).status_code == 200
    r = await gw.deliver(event("checkout.session.completed", session(sid3, tid, 2000, pi=pi3)))
    assert r.json()["outcome"] == f"credited 15.000000 to {tid}"
    assert await gw.balance(tid) == 15_000_000 and await gw.verify() == []


async def test_refund_of_a_payment_stripe_does_not_know_as_ours_is_ignored(gw1: Gateway) -> None:
    r = await gw1.deliver(event("charge.refunded", charge("pi_other_app", 2000)))
    assert r.status_code == 200 and r.json()["outcome"] == "ignored: charge is not a Tollway top-up"
    assert gw1.fake.requests[-1].form == {"payment_intent": "pi_other_app", "limit": "1"}


async def test_refund_is_redelivered_when_stripe_cannot_be_asked(gw1: Gateway) -> None:
    tid = await gw1.tenant()
    sid, pi = await open_checkout(gw1, tid), "pi_" + secrets.token_hex(8)
    gw1.fake.pay(sid, pi)
    gw1.fake.fail_with = (500, {"type": "api_error", "message": "down"})
    refund = event("charge.refunded", charge(pi, 2000))
    r = await gw1.deliver(refund)
    assert r.status_code == 503 and await gw1.rows(stripe_events) == []
    gw1.fake.fail_with = None
    assert (await gw1.deliver(refund)).json()["outcome"] == "recorded refund of 20.000000 before credit"
    await gw1.deliver(event("checkout.session.completed", session(sid, tid, 2000, pi=pi)))
    assert await gw1.balance(tid) == 0 and await gw1.verify() == []


async def test_dispute_before_completion_is_redelivered_then_debited(gw: Gateway) -> None:
    tid = await gw.tenant()
    sid, pi = await open_checkout(gw, tid), "pi_" + secrets.token_hex(8)
    gw.fake.pay(sid, pi)
    opened = event("charge.dispute.created", dispute("dp_early", pi, 2000, "needs_response"))
    r = await gw.deliver(opened)
    assert r.status_code == 503 and r.json()["error"]["code"] == "payment_not_yet_credited"
    assert await gw.rows(stripe_events) == []
    r = await gw.deliver(event("checkout.session.completed", session(sid, tid, 2000, pi=pi)))
    assert r.json()["outcome"] == f"credited 20.000000 to {tid}"
    # Stripe's redelivery of the dispute now finds the credited top-up.
    assert (await gw.deliver(opened)).json()["outcome"] == "debited 20.000000 for dispute"
    assert await gw.balance(tid) == 0
    r = await gw.deliver(event("charge.dispute.closed", dispute("dp_early", pi, 2000, "won")))
    assert r.json()["outcome"] == "re-credited 20.000000: dispute won"
    assert await gw.balance(tid) == 20_000_000 and await gw.verify() == []


async def test_dispute_closed_before_created_settles_as_closed(gw: Gateway) -> None:
    tid = await gw.tenant()
    _, pi_won, _ = await paid_topup(gw, tid, "20.00")
    _, pi_lost, _ = await paid_topup(gw, tid, "30.00")
    # Won, delivered before its "created": nothing may stay debited.
    r = await gw.deliver(event("charge.dispute.closed", dispute("dp_won", pi_won, 2000, "won")))
    assert r.json()["outcome"] == "debited 20.000000 for dispute; re-credited 20.000000: dispute won"
    r = await gw.deliver(event("charge.dispute.created", dispute("dp_won", pi_won, 2000, "needs_response")))
    assert r.json()["outcome"] == "dispute already debited"
    assert await gw.balance(tid) == 50_000_000
    # Lost, delivered before its "created": debited once.
    r = await gw.deliver(event("charge.dispute.closed", dispute("dp_lost", pi_lost, 3000, "lost")))
    assert r.json()["outcome"] == "debited 30.000000 for dispute; dispute closed lost: debit stands"
    r = await gw.deliver(event("charge.dispute.created", dispute("dp_lost", pi_lost, 3000, "needs_response")))
    assert r.json()["outcome"] == "dispute already debited"
    assert await gw.balance(tid) == 20_000_000 and await gw.verify() == []


async def test_chunked_webhook_body_is_cut_off_at_the_cap(gw1: Gateway) -> None:
    port = int(str(gw1.http.base_url).rsplit(":", 1)[1].rstrip("/"))
    head = post_head("/webhooks/stripe", length=None)
    sent, answer = await asyncio.to_thread(push, port, head, 120 << 20, chunked=True)
    status, body = status_and_json(answer)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert sent < 48 << 20 and await gw1.rows(stripe_events) == []


async def test_absurd_amounts_are_refused_not_a_server_error(gw: Gateway) -> None:
    tid = await gw.tenant()
    sid = await open_checkout(gw, tid)
    r = await gw.deliver(event("checkout.session.completed", session(sid, tid, 10**20)))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_event", r.text
    _, pi, _ = await paid_topup(gw, tid, "20.00")
    r = await gw.deliver(event("charge.dispute.created", dispute("dp_huge", pi, 10**20, "needs_response")))
    assert r.status_code == 400, r.text
    assert await gw.balance(tid) == 20_000_000 and await gw.verify() == []
