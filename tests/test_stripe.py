"""Stripe top-ups: Checkout against a fake Stripe API on loopback, and the webhook with
events signed here exactly as Stripe signs them (HMAC-SHA256 of "t.body" under the whole
whsec_ string). The gateway runs under uvicorn; state is read through a second Services."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import ServerThread
from tests.fakes.stripe_api import FakeStripe
from tollway.app import create_app
from tollway.config import Config, ConfigError
from tollway.services import Services, build
from tollway.store.schema import ledger_entries, stripe_events, topups

SK = "sk_test_fake_" + "k" * 24
WHSEC = "whsec_test_" + "s" * 32
ADMIN = "admin-token-for-stripe-tests-0123"
VERIFY_AGE_MS = 3_600_000


def sign(payload: bytes, secret: str = WHSEC, t: int | None = None) -> str:
    """Stripe's v1 scheme, by hand: stripe-python has no public signing helper."""
    t = int(time.time()) if t is None else t
    sig = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={sig}"


def event(etype: str, obj: dict[str, Any], event_id: str | None = None) -> bytes:
    return json.dumps({"id": event_id or "evt_" + secrets.token_hex(12), "object": "event",
                       "api_version": "2025-06-30.basil", "created": int(time.time()), "livemode": False,
                       "pending_webhooks": 1, "type": etype, "data": {"object": obj}}).encode()


def session(session_id: str, tenant_id: str, cents: int, *, paid: str = "paid", currency: str = "usd",
            pi: str | None = None, metadata: bool = True) -> dict[str, Any]:
    return {"id": session_id, "object": "checkout.session", "mode": "payment", "amount_total": cents,
            "currency": currency, "client_reference_id": tenant_id,
            "metadata": {"tollway_tenant_id": tenant_id} if metadata else {},
            "payment_status": paid, "status": "complete", "payment_intent": pi or "pi_" + secrets.token_hex(8)}


def charge(pi: str, refunded_cents: int, cents: int = 2000, currency: str = "usd") -> dict[str, Any]:
    return {"id": "ch_" + pi[3:], "object": "charge", "amount": cents, "amount_refunded": refunded_cents,
            "refunded": refunded_cents >= cents, "currency": currency, "payment_intent": pi}


def dispute(dispute_id: str, pi: str, cents: int, status: str) -> dict[str, Any]:
    return {"id": dispute_id, "object": "dispute", "amount": cents, "charge": "ch_" + pi[3:], "currency": "usd",
            "payment_intent": pi, "reason": "fraudulent", "status": status}


@dataclass
class Gateway:
    http: httpx.AsyncClient
    svc: Services           # a second set of services on the same database, for inspection
    fake: FakeStripe
    cfg: Config

    async def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return await self.http.request(method, "/admin" + path, headers={"authorization": f"Bearer {ADMIN}"}, **kw)

    async def tenant(self) -> str:
        return str((await self.admin("POST", "/tenants", json={"name": "Ada"})).json()["tenant_id"])

    async def deliver(self, payload: bytes, signature: str | None = None) -> httpx.Response:
        headers = {"content-type": "application/json", "stripe-signature": signature or sign(payload)}
        return await self.http.post("/webhooks/stripe", content=payload, headers=headers)

    async def balance(self, tenant_id: str) -> int:
        return await self.svc.ledger.balance(tenant_id)

    async def rows(self, table: sa.Table) -> list[dict[str, Any]]:
        async with self.svc.store.read() as conn:
            return [dict(r) for r in (await conn.execute(sa.select(table))).mappings().all()]

    async def verify(self) -> list[str]:
        return await self.svc.ledger.verify(VERIFY_AGE_MS)


STRIPE_TABLE = {"currency": "usd", "min_topup_usd": "5", "max_topup_usd": "500",
                "success_url": "https://app.example/wallet?paid={CHECKOUT_SESSION_ID}",
                "cancel_url": "https://app.example/wallet", "webhook_tolerance_seconds": 300}


@pytest.fixture
def fake_stripe(serve_app: Callable[[Any], ServerThread]) -> tuple[FakeStripe, str]:
    fake = FakeStripe(api_key=SK)
    return fake, serve_app(fake.app()).url


async def start(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
                fake_stripe: tuple[FakeStripe, str], stack: dict[str, Any]) -> AsyncIterator[Gateway]:
    fake, fake_url = fake_stripe
    cfg = make_config(**stack, stripe={**STRIPE_TABLE, "api_base": fake_url})
    server = serve_app(create_app(cfg, provider_keys={}, migrate=True))
    svc = build(cfg)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            yield Gateway(http, svc, fake, cfg)
    finally:
        await svc.close()


@pytest.fixture(autouse=True)
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRIPE_SECRET_KEY", SK)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", WHSEC)
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", ADMIN)


@pytest.fixture
async def gw(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
             fake_stripe: tuple[FakeStripe, str], backend: dict[str, Any]) -> AsyncIterator[Gateway]:
    """On both stacks: SQLite + memory, PostgreSQL + Redis."""
    async for g in start(make_config, serve_app, fake_stripe, backend):
        yield g


@pytest.fixture
async def gw1(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
              fake_stripe: tuple[FakeStripe, str], embedded: dict[str, Any]) -> AsyncIterator[Gateway]:
    """Embedded only: for behaviour that does not depend on the database."""
    async for g in start(make_config, serve_app, fake_stripe, embedded):
        yield g


async def paid_topup(g: Gateway, tenant_id: str, amount: str = "20.00") -> tuple[str, str, str]:
    """Create a session through the admin API and deliver its paid completion -> (session, intent, outcome)."""
    created = (await g.admin("POST", f"/tenants/{tenant_id}/topups", json={"amount_usd": amount})).json()
    sid, pi = created["session_id"], "pi_" + secrets.token_hex(8)
    cents = int(amount.replace(".", ""))
    r = await g.deliver(event("checkout.session.completed", session(sid, tenant_id, cents, pi=pi)))
    assert r.status_code == 200, r.text
    return sid, pi, r.json()["outcome"]


# --- Checkout ----------------------------------------------------------------------------------


async def test_checkout_session_carries_amount_tenant_and_urls(gw1: Gateway) -> None:
    tid = await gw1.tenant()
    r = await gw1.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "20.00"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["checkout_url"].startswith("https://checkout.stripe.com/") and body["session_id"].startswith("cs_")
    assert body["amount_usd"] == "20.000000" and body["currency"] == "usd"
    [req] = gw1.fake.requests
    assert req.content_type.startswith("application/x-www-form-urlencoded")
    assert req.headers["authorization"] == f"Bearer {SK}" and req.headers["idempotency-key"]
    f = req.form
    assert f["mode"] == "payment" and f["line_items[0][quantity]"] == "1"
    assert f["line_items[0][price_data][unit_amount]"] == "2000"
    assert f["line_items[0][price_data][currency]"] == "usd"
    assert f["client_reference_id"] == tid and f["metadata[tollway_tenant_id]"] == tid
    assert f["payment_intent_data[metadata][tollway_tenant_id]"] == tid
    assert f["success_url"] == STRIPE_TABLE["success_url"] and f["cancel_url"] == STRIPE_TABLE["cancel_url"]
    [row] = await gw1.rows(topups)
    assert (row["session_id"], row["tenant_id"], row["amount_micros"], row["status"], row["currency"]) == (
        body["session_id"], tid, 20_000_000, "created", "usd")
    assert await gw1.balance(tid) == 0  # paying is what credits, not asking to pay


async def test_checkout_idempotency_key_returns_the_same_session(gw1: Gateway) -> None:
    tid = await gw1.tenant()
    first = await gw1.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "7.50", "idempotency_key": "c1"})
    again = await gw1.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "7.50", "idempotency_key": "c1"})
    assert first.json()["session_id"] == again.json()["session_id"]
    assert len(await gw1.rows(topups)) == 1
    assert {r.headers["idempotency-key"] for r in gw1.fake.requests} == {f"tollway-topup-{tid}-c1"}


@pytest.mark.parametrize(("amount", "code"), [("4.99", "amount_out_of_range"), ("500.01", "amount_out_of_range"),
                                              ("20.005", "invalid_amount"), ("abc", "invalid_request"),
                                              ("-20", "amount_out_of_range")])
async def test_checkout_amount_must_be_within_limits(gw1: Gateway, amount: str, code: str) -> None:
    tid = await gw1.tenant()
    r = await gw1.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": amount})
    assert r.status_code == 400 and r.json()["error"]["code"] == code
    assert gw1.fake.requests == [] and await gw1.rows(topups) == []


async def test_checkout_for_unknown_tenant_is_404(gw1: Gateway) -> None:
    r = await gw1.admin("POST", "/tenants/tn_nobody/topups", json={"amount_usd": "20.00"})
    assert r.status_code == 404 and gw1.fake.requests == []


async def test_stripe_failure_is_502_without_the_secret_key(gw1: Gateway) -> None:
    tid = await gw1.tenant()
    gw1.fake.fail_with = (400, {"type": "invalid_request_error", "message": f"bad request for key {SK}"})
    r = await gw1.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "20.00"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "payment_provider_error"
    assert SK not in r.text and SK[:12] not in r.text
    assert await gw1.rows(topups) == []


async def test_wrong_secret_key_is_502_and_never_echoed(make_config: Callable[..., Config],
                                                        serve_app: Callable[[Any], ServerThread],
                                                        fake_stripe: tuple[FakeStripe, str],
                                                        embedded: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_wrong_" + "w" * 24)
    async for g in start(make_config, serve_app, fake_stripe, embedded):
        tid = await g.tenant()
        r = await g.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "20.00"})
        assert r.status_code == 502 and "sk_test_wrong" not in r.text
        assert len(g.fake.requests) == 1  # a 401 is not retried


async def test_topups_and_webhook_are_off_without_a_stripe_table(make_config: Callable[..., Config],
                                                                 serve_app: Callable[[Any], ServerThread]) -> None:
    server = serve_app(create_app(make_config(), provider_keys={}))
    async with httpx.AsyncClient(base_url=server.url) as http:
        tid = (await http.post("/admin/tenants", json={}, headers={"authorization": f"Bearer {ADMIN}"})).json()
        r = await http.post(f"/admin/tenants/{tid['tenant_id']}/topups", json={"amount_usd": "20.00"},
                            headers={"authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "payments_disabled"
        payload = event("checkout.session.completed", session("cs_x", "tn_x", 2000))
        assert (await http.post("/webhooks/stripe", content=payload,
                                headers={"stripe-signature": sign(payload)})).status_code == 404


@pytest.mark.parametrize(("unset", "override", "message"), [
    ("STRIPE_WEBHOOK_SECRET", {}, "STRIPE_WEBHOOK_SECRET"),
    ("STRIPE_SECRET_KEY", {}, "STRIPE_SECRET_KEY"),
    (None, {"webhook_tolerance_seconds": 0}, "stripe.webhook_tolerance_seconds"),
    (None, {"currency": "dollars"}, "stripe.currency"),
])
def test_startup_refused_when_stripe_is_misconfigured(make_config: Callable[..., Config],
                                                      monkeypatch: pytest.MonkeyPatch, unset: str | None,
                                                      override: dict[str, Any], message: str) -> None:
    if unset:
        monkeypatch.delenv(unset)
    cfg = make_config(stripe={**STRIPE_TABLE, **override})
    with pytest.raises(ConfigError, match=message):
        create_app(cfg, provider_keys={})


# --- the webhook: signatures ----------------------------------------------------------------------


async def test_forged_stale_or_missing_signatures_are_400_and_change_nothing(gw1: Gateway) -> None:
    tid = await gw1.tenant()
    created = (await gw1.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "20.00"})).json()
    payload = event("checkout.session.completed", session(created["session_id"], tid, 2000))
    tampered = payload.replace(b'"amount_total": 2000', b'"amount_total": 200000')
    assert tampered != payload
    now = int(time.time())
    cases = {
        "tampered body": (tampered, sign(payload)),
        "wrong secret": (payload, sign(payload, secret="whsec_someone_else_" + "x" * 20)),
        "old timestamp": (payload, sign(payload, t=now - 301)),
        "stale replay of a once-valid signature": (payload, sign(payload, t=now - 3600)),
        "no v1 signature": (payload, f"t={now},v0=" + "0" * 64),
        "garbage header": (payload, "nonsense"),
    }
    for name, (body, sig) in cases.items():
        r = await gw1.deliver(body, sig)
        assert r.status_code == 400, name
        assert r.json()["error"]["code"] == "invalid_signature", name
    r = await gw1.http.post("/webhooks/stripe", content=payload)  # no header at all
    assert r.status_code == 400
    assert await gw1.balance(tid) == 0
    assert await gw1.rows(stripe_events) == []
    assert [e for e in await gw1.rows(ledger_entries) if e["tenant_id"] == tid] == []
    # The same event, correctly signed, within the tolerance, does credit: the cases above failed on signature.
    ok = await gw1.deliver(payload, sign(payload, t=now - 290))
    assert ok.status_code == 200 and await gw1.balance(tid) == 20_000_000


async def test_rolled_secret_header_with_two_v1_signatures_verifies(gw1: Gateway) -> None:
    # While an endpoint secret rolls over, Stripe signs with both: one matching v1 is enough.
    tid = await gw1.tenant()
    payload = event("checkout.session.completed", session("cs_roll", tid, 1000))
    old = sign(payload, secret="whsec_retired_" + "r" * 20).split("v1=")[1]
    r = await gw1.deliver(payload, f"{sign(payload)},v1={old}")
    assert r.status_code == 200 and await gw1.balance(tid) == 10_000_000


async def test_oversized_body_is_refused_before_verification(gw1: Gateway) -> None:
    payload = b'{"pad": "' + b"x" * (1 << 20) + b'"}'
    r = await gw1.deliver(payload)
    assert r.status_code == 413 and await gw1.rows(stripe_events) == []


async def test_signed_body_that_is_not_an_event_is_400(gw1: Gateway) -> None:
    for body in (b"not json", b'{"object": "v2.core.event", "id": "evt_1", "type": "x"}'):
        r = await gw1.deliver(body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_event"
    assert await gw1.rows(stripe_events) == []


# --- the webhook: exactly once -------------------------------------------------------------------


async def test_same_event_ten_times_credits_once(gw: Gateway) -> None:
    tid = await gw.tenant()
    created = (await gw.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "20.00"})).json()
    payload = event("checkout.session.completed", session(created["session_id"], tid, 2000, pi="pi_ten"))
    outcomes = []
    for _ in range(10):
        r = await gw.deliver(payload)
        assert r.status_code == 200
        outcomes.append(r.json()["outcome"])
    assert outcomes == [f"credited 20.000000 to {tid}"] + ["duplicate"] * 9
    assert await gw.balance(tid) == 20_000_000
    credits = [e for e in await gw.rows(ledger_entries) if e["tenant_id"] == tid]
    assert [(e["id"], e["kind"], e["amount_micros"]) for e in credits] == [
        (f"stripe:topup:{created['session_id']}", "topup", 20_000_000)]
    [row] = await gw.rows(topups)
    assert (row["status"], row["payment_intent"]) == ("paid", "pi_ten")
    [evt] = await gw.rows(stripe_events)
    assert evt["outcome"] == f"credited 20.000000 to {tid}"
    assert await gw.verify() == []


async def test_same_event_from_twenty_concurrent_tasks_credits_once(gw: Gateway) -> None:
    tid = await gw.tenant()
    created = (await gw.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "50.00"})).json()
    payload = event("checkout.session.completed", session(created["session_id"], tid, 5000))
    responses = await asyncio.gather(*[gw.deliver(payload) for _ in range(20)])
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses if r.status_code != 200]
    outcomes = sorted(r.json()["outcome"] for r in responses)
    assert outcomes == sorted([f"credited 50.000000 to {tid}"] + ["duplicate"] * 19)
    assert await gw.balance(tid) == 50_000_000
    assert len(await gw.rows(stripe_events)) == 1
    assert await gw.verify() == []


async def test_two_events_about_one_session_credit_once(gw: Gateway) -> None:
    tid = await gw.tenant()
    sid = (await gw.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "20.00"})).json()["session_id"]
    completed = event("checkout.session.completed", session(sid, tid, 2000, pi="pi_two"))
    succeeded = event("checkout.session.async_payment_succeeded", session(sid, tid, 2000, pi="pi_two"))
    assert (await gw.deliver(completed)).json()["outcome"].startswith("credited")
    assert (await gw.deliver(succeeded)).json()["outcome"] == "already credited"
    # ...and racing: ten distinct events about another session, all at once.
    sid2 = (await gw.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "30.00"})).json()["session_id"]
    racing = [event(t, session(sid2, tid, 3000, pi="pi_race")) for t in
              ["checkout.session.completed", "checkout.session.async_payment_succeeded"] * 5]
    responses = await asyncio.gather(*[gw.deliver(p) for p in racing])
    assert [r.status_code for r in responses] == [200] * 10
    assert sum(r.json()["outcome"].startswith("credited") for r in responses) == 1
    assert await gw.balance(tid) == 50_000_000
    assert len(await gw.rows(stripe_events)) == 12
    assert await gw.verify() == []


# --- the webhook: payment states -----------------------------------------------------------------


async def test_unpaid_session_waits_for_async_payment(gw1: Gateway) -> None:
    tid = await gw1.tenant()
    sid = (await gw1.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "20.00"})).json()["session_id"]
    r = await gw1.deliver(event("checkout.session.completed", session(sid, tid, 2000, paid="unpaid", pi="pi_ach")))
    assert r.json()["outcome"] == "pending: awaiting asynchronous payment"
    assert await gw1.balance(tid) == 0
    assert (await gw1.rows(topups))[0]["status"] == "pending"
    r = await gw1.deliver(event("checkout.session.async_payment_succeeded", session(sid, tid, 2000, pi="pi_ach")))
    assert r.json()["outcome"] == f"credited 20.000000 to {tid}"
    assert await gw1.balance(tid) == 20_000_000
    # A failed delayed payment on another session credits nothing.
    sid2 = (await gw1.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "10.00"})).json()["session_id"]
    await gw1.deliver(event("checkout.session.completed", session(sid2, tid, 1000, paid="unpaid", pi="pi_f")))
    r = await gw1.deliver(event("checkout.session.async_payment_failed", session(sid2, tid, 1000, paid="unpaid")))
    assert r.json()["outcome"].startswith("failed")
    statuses = {row["session_id"]: row["status"] for row in await gw1.rows(topups)}
    assert statuses == {sid: "paid", sid2: "failed"}
    assert await gw1.balance(tid) == 20_000_000
    assert await gw1.verify() == []


async def test_refund_recorded_before_the_credit_is_netted(gw1: Gateway) -> None:
    tid = await gw1.tenant()
    sid = (await gw1.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "20.00"})).json()["session_id"]
    await gw1.deliver(event("checkout.session.completed", session(sid, tid, 2000, paid="unpaid", pi="pi_early")))
    r = await gw1.deliver(event("charge.refunded", charge("pi_early", 500)))
    assert r.json()["outcome"] == "recorded refund of 5.000000 before credit"
    r = await gw1.deliver(event("checkout.session.async_payment_succeeded", session(sid, tid, 2000, pi="pi_early")))
    assert r.json()["outcome"] == f"credited 15.000000 to {tid}"
    assert await gw1.balance(tid) == 15_000_000 and await gw1.verify() == []


async def test_currency_mismatch_is_refused_and_recorded(gw: Gateway) -> None:
    tid = await gw.tenant()
    sid = (await gw.admin("POST", f"/tenants/{tid}/topups", json={"amount_usd": "20.00"})).json()["session_id"]
    r = await gw.deliver(event("checkout.session.completed", session(sid, tid, 2000, currency="eur")))
    assert r.status_code == 200 and r.json()["outcome"] == "refused: currency eur is not usd"
    assert await gw.balance(tid) == 0
    [evt] = await gw.rows(stripe_events)
    assert (evt["type"], evt["outcome"]) == ("checkout.session.completed", "refused: currency eur is not usd")
    assert (await gw.rows(topups))[0]["status"] == "refused"
    # A refund in another currency against a real top-up is refused too, not debited.
    _, pi, _ = await paid_topup(gw, tid)
    r = await gw.deliver(event("charge.refunded", charge(pi, 2000, currency="gbp")))
    assert r.json()["outcome"] == "refused: currency gbp is not usd"
    assert await gw.balance(tid) == 20_000_000 and await gw.verify() == []


async def test_unknown_events_and_foreign_payments_are_acknowledged_and_ignored(gw1: Gateway) -> None:
    tid = await gw1.tenant()
    r = await gw1.deliver(event("customer.created", {"id": "cus_1", "object": "customer"}))
    assert r.status_code == 200 and r.json()["outcome"] == "ignored: event type not used"
    r = await gw1.deliver(event("charge.refunded", charge("pi_not_ours", 2000)))
    assert r.json()["outcome"] == "ignored: charge is not a Tollway top-up"
    r = await gw1.deliver(event("checkout.session.completed", session("cs_other_app", tid, 2000, metadata=False)))
    assert r.json()["outcome"] == "ignored: not a Tollway top-up"
    assert await gw1.balance(tid) == 0 and len(await gw1.rows(stripe_events)) == 3


async def test_session_with_our_metadata_but_no_row_is_adopted(gw1: Gateway) -> None:
    # Stripe created the session but the gateway stopped before recording it.
    tid = await gw1.tenant()
    r = await gw1.deliver(event("checkout.session.completed", session("cs_orphan", tid, 1234)))
    assert r.json()["outcome"] == f"credited 12.340000 to {tid}"
    [row] = await gw1.rows(topups)
    assert (row["session_id"], row["tenant_id"], row["amount_micros"], row["status"]) == (
        "cs_orphan", tid, 12_340_000, "paid")


# --- refunds and disputes --------------------------------------------------------------------------


async def test_refunds_debit_the_delta_never_below_zero(gw: Gateway) -> None:
    tid = await gw.tenant()
    _, pi, _ = await paid_topup(gw, tid, "20.00")
    # The customer spends 12 of the 20 through the normal request path.
    await gw.svc.ledger.reserve(tid, "req_spend", 12_000_000)
    await gw.svc.ledger.settle("req_spend", 12_000_000)
    partial = event("charge.refunded", charge(pi, 500))
    r = await gw.deliver(partial)
    assert r.json()["outcome"] == "debited 5.000000 for refund"
    assert await gw.balance(tid) == 3_000_000
    assert (await gw.deliver(partial)).json()["outcome"] == "duplicate"
    # Another event reporting the same cumulative refund moves nothing.
    r = await gw.deliver(event("charge.refunded", charge(pi, 500)))
    assert r.json()["outcome"] == "ignored: refund already applied"
    # The rest is refunded: 15 more, but only 3 remain. The wallet stops at zero, the gap is recorded.
    r = await gw.deliver(event("charge.refunded", charge(pi, 2000)))
    outcome = r.json()["outcome"]
    assert outcome == "debited 3.000000 for refund, shortfall 12.000000 not covered by the balance"
    assert await gw.balance(tid) == 0
    assert any(e["outcome"] == outcome for e in await gw.rows(stripe_events))
    refunds = sorted((e["id"], e["amount_micros"]) for e in await gw.rows(ledger_entries) if e["kind"] == "refund")
    assert refunds == [(f"stripe:refund:ch_{pi[3:]}:20000000", -3_000_000),
                       (f"stripe:refund:ch_{pi[3:]}:5000000", -5_000_000)]
    assert (await gw.rows(topups))[0]["refunded_micros"] == 20_000_000
    # An older, smaller cumulative arriving late changes nothing.
    r = await gw.deliver(event("charge.refunded", charge(pi, 1000)))
    assert r.json()["outcome"] == "ignored: refund already applied"
    assert await gw.balance(tid) == 0 and await gw.verify() == []


async def test_disputes_debit_on_open_and_recredit_when_won(gw: Gateway) -> None:
    tid = await gw.tenant()
    _, pi_a, _ = await paid_topup(gw, tid, "20.00")
    _, pi_b, _ = await paid_topup(gw, tid, "30.00")
    assert await gw.balance(tid) == 50_000_000
    opened = event("charge.dispute.created", dispute("dp_a", pi_a, 2000, "needs_response"))
    assert (await gw.deliver(opened)).json()["outcome"] == "debited 20.000000 for dispute"
    assert (await gw.deliver(opened)).json()["outcome"] == "duplicate"
    assert await gw.balance(tid) == 30_000_000
    r = await gw.deliver(event("charge.dispute.closed", dispute("dp_a", pi_a, 2000, "won")))
    assert r.json()["outcome"] == "re-credited 20.000000: dispute won"
    assert await gw.balance(tid) == 50_000_000
    # Dispute on B, lost: the debit stands.
    await gw.deliver(event("charge.dispute.created", dispute("dp_b", pi_b, 3000, "needs_response")))
    r = await gw.deliver(event("charge.dispute.closed", dispute("dp_b", pi_b, 3000, "lost")))
    assert r.json()["outcome"] == "dispute closed lost: debit stands"
    assert await gw.balance(tid) == 20_000_000
    assert await gw.verify() == []


async def test_dispute_beyond_the_balance_recredits_only_what_was_taken(gw: Gateway) -> None:
    tid = await gw.tenant()
    _, pi, _ = await paid_topup(gw, tid, "20.00")
    await gw.svc.ledger.reserve(tid, "req_spend", 15_000_000)
    await gw.svc.ledger.settle("req_spend", 15_000_000)
    r = await gw.deliver(event("charge.dispute.created", dispute("dp_c", pi, 2000, "needs_response")))
    assert r.json()["outcome"] == "debited 5.000000 for dispute, shortfall 15.000000 not covered by the balance"
    assert await gw.balance(tid) == 0
    won = event("charge.dispute.closed", dispute("dp_c", pi, 2000, "won"))
    assert (await gw.deliver(won)).json()["outcome"] == "re-credited 5.000000: dispute won"
    # A second "closed" event (another id) does not pay back twice.
    r = await gw.deliver(event("charge.dispute.closed", dispute("dp_c", pi, 2000, "won")))
    assert r.json()["outcome"] == "already re-credited"
    assert await gw.balance(tid) == 5_000_000 and await gw.verify() == []
    balances = [e["balance_after_micros"] for e in await gw.rows(ledger_entries)]
    assert min(balances) >= 0
