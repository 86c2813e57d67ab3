"""Wallets and the ledger: idempotent entries, no overspend under concurrency, verify,
the sweep's release and the late settle, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tollway.cli import main as cli_main
from tollway.config import Config
from tollway.errors import InsufficientFunds, SpendLimitExceeded
from tollway.services import Services, build
from tollway.store.schema import key_spend, ledger_entries, reservations, usage_events, wallets
from tests.conftest import fresh_pg_database

HOUR_MS = 3_600_000


@pytest.fixture
async def svc(make_config: Callable[..., Config], backend: dict[str, Any]) -> AsyncIterator[Services]:
    s = build(make_config(**backend))
    if s.store.is_sqlite:
        await s.store.migrate()
    yield s
    await s.close()


async def new_tenant(svc: Services, credit: int = 0) -> str:
    tid = str((await svc.tenants.create("Ada"))["tenant_id"])
    if credit:
        await svc.ledger.credit(tid, credit, f"seed:{tid}")
    return tid


def rid() -> str:
    return "req_" + secrets.token_hex(12)


def usage(key_id: str | None = None) -> dict[str, Any]:
    return {"key_id": key_id, "model": "demo/echo", "provider": "echo", "prompt_tokens": 10, "completion_tokens": 5,
            "cached_tokens": 0, "reasoning_tokens": 0, "estimated": False, "status": 200, "error_type": None,
            "latency_ms": 3}


async def count(svc: Services, table: sa.Table, *where: Any) -> int:
    async with svc.store.read() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table).where(*where))).scalar_one())


# --- idempotency ------------------------------------------------------------------------------


async def test_ten_replays_of_a_credit_move_the_balance_once(svc: Services) -> None:
    tid = await new_tenant(svc)
    results = [await svc.ledger.credit(tid, 5_000_000, "stripe:topup:cs_1", kind="topup") for _ in range(5)]
    results += await asyncio.gather(*(svc.ledger.credit(tid, 5_000_000, "stripe:topup:cs_1") for _ in range(5)))
    assert [r["applied"] for r in results].count(True) == 1
    assert await svc.ledger.balance(tid) == 5_000_000
    assert await count(svc, ledger_entries, ledger_entries.c.tenant_id == tid) == 1
    # The operator's credit is idempotent on its reference.
    for _ in range(10):
        await svc.ledger.credit_manual(tid, 1_000_000, "invoice-7")
    assert await svc.ledger.balance(tid) == 6_000_000
    assert await svc.ledger.verify(HOUR_MS) == []


async def test_ten_replays_of_a_debit_move_the_balance_once(svc: Services) -> None:
    tid = await new_tenant(svc, 10_000_000)
    results = [await svc.ledger.debit(tid, 3_000_000, "stripe:refund:ch_1:3", kind="refund") for _ in range(5)]
    results += await asyncio.gather(*(svc.ledger.debit(tid, 3_000_000, "stripe:refund:ch_1:3") for _ in range(5)))
    assert [r["applied"] for r in results].count(True) == 1
    assert await svc.ledger.balance(tid) == 7_000_000
    # A debit beyond the balance takes what exists and reports the shortfall; never negative.
    over = await svc.ledger.debit(tid, 9_000_000, "stripe:dispute:dp_1", kind="dispute")
    assert (over["balance_micros"], over["shortfall_micros"]) == (0, 2_000_000)
    assert await svc.ledger.verify(HOUR_MS) == []


async def test_ten_replays_of_a_settle_charge_once(svc: Services) -> None:
    tid = await new_tenant(svc, 1_000_000)
    r = rid()
    assert await svc.ledger.reserve(tid, r, 400_000) == 600_000
    results = [await svc.ledger.settle(r, 123_456, usage())]
    results += await asyncio.gather(*(svc.ledger.settle(r, 123_456, usage()) for _ in range(4)))
    results += [await svc.ledger.settle(r, 999, usage()) for _ in range(5)]
    assert results == [123_456] + [None] * 9
    assert await svc.ledger.balance(tid) == 1_000_000 - 123_456
    assert await count(svc, usage_events, usage_events.c.request_id == r) == 1
    assert await count(svc, reservations) == 0
    kinds = sorted(e["kind"] for e in await svc.ledger.entries(tid))
    assert kinds == ["credit", "debit", "release", "reserve"]
    assert await svc.ledger.verify(HOUR_MS) == []


async def test_a_request_id_is_reserved_once(svc: Services) -> None:
    tid = await new_tenant(svc, 1_000_000)
    r = rid()
    await svc.ledger.reserve(tid, r, 100_000)
    with pytest.raises(sa.exc.IntegrityError):
        await svc.ledger.reserve(tid, r, 100_000)
    assert await svc.ledger.balance(tid) == 900_000  # the second hold rolled back whole
    with pytest.raises(ValueError):
        await svc.ledger.reserve(tid, rid(), -1)
    assert await svc.ledger.verify(HOUR_MS) == []


# --- no overspend ---------------------------------------------------------------------------------


async def test_200_concurrent_requests_against_a_wallet_covering_20(svc: Services) -> None:
    price = 37_000
    tid = await new_tenant(svc, 20 * price)

    async def request() -> int:
        r = rid()
        try:
            await svc.ledger.reserve(tid, r, price, worker_id="wk_test")
        except InsufficientFunds as exc:
            return exc.status
        await asyncio.sleep(0)  # let others interleave between reserve and settle
        assert await svc.ledger.settle(r, price, usage()) == price
        return 200

    statuses = await asyncio.gather(*(request() for _ in range(200)))
    assert statuses.count(200) == 20
    assert statuses.count(402) == 180
    assert await svc.ledger.balance(tid) == 0
    assert await count(svc, usage_events, usage_events.c.tenant_id == tid) == 20
    assert await svc.ledger.verify(HOUR_MS) == []


async def test_charge_beyond_hold_and_balance_is_capped_at_zero(svc: Services) -> None:
    tid = await new_tenant(svc, 1_000)
    r = rid()
    await svc.ledger.reserve(tid, r, 600)
    assert await svc.ledger.settle(r, 5_000) == 1_000  # the hold plus what was left, no more
    assert await svc.ledger.balance(tid) == 0
    assert await svc.ledger.verify(HOUR_MS) == []


async def test_key_spend_limit_holds_under_concurrency(svc: Services) -> None:
    tid = await new_tenant(svc, 100_000_000)
    key = await svc.keys.create(tid, spend_limit_micros=500_000, spend_limit_period="day")
    limit = dict(key_id=key["key_id"], key_limit_micros=500_000, key_period="2026-11-28")

    async def attempt() -> str:
        try:
            await svc.ledger.reserve(tid, rid(), 100_000, **limit)  # type: ignore[arg-type]
        except SpendLimitExceeded as exc:
            assert exc.status == 429 and "spend limit of 0.500000 USD" in exc.message
            return "429"
        return "ok"

    outcomes = await asyncio.gather(*(attempt() for _ in range(30)))
    assert outcomes.count("ok") == 5
    assert await svc.ledger.balance(tid) == 100_000_000 - 500_000  # refused holds took nothing
    # Settling below the hold frees the difference for the key's next requests.
    open_ids = await svc.ledger.open_reservations()
    for r in open_ids:
        await svc.ledger.settle(r, 40_000)
    async with svc.store.read() as conn:
        spent = (await conn.execute(sa.select(key_spend.c.spent_micros))).scalar_one()
    assert spent == 5 * 40_000
    await svc.ledger.reserve(tid, rid(), 300_000, **limit)  # type: ignore[arg-type]
    with pytest.raises(SpendLimitExceeded):
        await svc.ledger.reserve(tid, rid(), 1, **limit)  # type: ignore[arg-type]
    # Another period starts from zero.
    await svc.ledger.reserve(tid, rid(), 500_000, **{**limit, "key_period": "2026-11-29"})  # type: ignore[arg-type]
    assert await svc.ledger.verify(HOUR_MS) == []


# --- the sweep and the late settle ---------------------------------------------------------------


async def test_swept_reservation_is_released_then_a_late_settle_charges_once(svc: Services) -> None:
    tid = await new_tenant(svc, 1_000_000)
    r, other = rid(), rid()
    await svc.ledger.reserve(tid, r, 300_000, worker_id="wk_dead")
    await svc.ledger.reserve(tid, other, 200_000, worker_id="wk_dead")
    assert await svc.ledger.release_swept([r, other, "req_unknown"]) == 2
    assert await svc.ledger.release_swept([r]) == 0
    assert await svc.ledger.balance(tid) == 1_000_000
    assert await count(svc, reservations) == 0
    # The worker was alive after all (a stall): its settle still charges, once.
    results = await asyncio.gather(*(svc.ledger.settle(r, 120_000, usage()) for _ in range(5)))
    assert sorted(results, key=str) == [120_000] + [None] * 4
    assert await svc.ledger.settle(r, 120_000) is None
    assert await svc.ledger.balance(tid) == 880_000
    assert await count(svc, usage_events, usage_events.c.request_id == r) == 1
    # A settle of a request that was never reserved charges nothing.
    assert await svc.ledger.settle("req_never", 5_000) is None
    assert await svc.ledger.verify(HOUR_MS) == []


# --- verify ---------------------------------------------------------------------------------------


async def test_verify_names_the_tenant_on_any_mismatch(svc: Services) -> None:
    good, bad = await new_tenant(svc, 5_000), await new_tenant(svc, 5_000)
    assert await svc.ledger.verify(HOUR_MS) == []
    async with svc.store.write() as conn:  # a bug or a hand edit outside the ledger
        await conn.execute(wallets.update().where(wallets.c.tenant_id == bad).values(balance_micros=9_000))
    problems = await svc.ledger.verify(HOUR_MS)
    assert len(problems) == 1 and bad in problems[0] and good not in problems[0]
    r = rid()
    await svc.ledger.reserve(good, r, 1_000)
    assert len(await svc.ledger.verify(HOUR_MS)) == 1
    stale = await svc.ledger.verify(-1)  # every open reservation is "too old"
    assert any(r in p and good in p for p in stale)


def test_cli_ledger_verify_and_idempotent_wallet_credit(make_config: Callable[..., Config]) -> None:
    cfg = make_config()
    runner = CliRunner()

    def cli(*args: str) -> Any:
        return runner.invoke(cli_main, [*args, "--config", cfg.source, "--json"], catch_exceptions=False)

    import json

    tid = json.loads(cli("tenants", "create", "--name", "Ada").stdout)["tenant_id"]
    outs = [json.loads(cli("wallet", "credit", "--tenant", tid, "--amount", "2.50", "--reference", "inv-9").stdout)
            for _ in range(3)]
    assert [o["applied"] for o in outs] == [True, False, False]
    assert outs[-1]["balance_usd"] == "2.500000"
    ok = cli("ledger", "verify")
    assert ok.exit_code == 0 and json.loads(ok.stdout) == {"ok": True, "problems": []}

    async def corrupt() -> None:
        s = build(cfg)
        async with s.store.write() as conn:
            await conn.execute(wallets.update().where(wallets.c.tenant_id == tid).values(balance_micros=1))
        await s.close()

    asyncio.run(corrupt())
    res = runner.invoke(cli_main, ["ledger", "verify", "--config", cfg.source])
    assert res.exit_code == 1
    assert tid in res.stderr and "ledger sum 2.500000" in res.stderr


# --- random interleavings: a Hypothesis state machine -------------------------------------------


class LedgerMachine(RuleBasedStateMachine):
    """A model of one wallet next to the real ledger. Rules interleave credits, debits,
    reserves, settles, releases, sweeps and concurrent bursts in any order; after every
    step the balance equals the model, the sum of the ledger (verify) and is never negative."""

    svc: Services
    run: Callable[[Any], Any]

    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.tenant = self.run(new_tenant(self.svc))
        self.expected = 0
        self.open: dict[str, int] = {}     # request -> held
        self.swept: set[str] = set()        # released by the sweep, not settled yet
        self.entries: set[str] = set()      # credit/debit entry ids applied

    @rule(amount=st.integers(1, 5_000), ref=st.sampled_from("abcd"))
    def credit(self, amount: int, ref: str) -> None:
        entry = f"{self.tenant}:credit:{ref}"
        res = self.run(self.svc.ledger.credit(self.tenant, amount, entry))
        assert res["applied"] == (entry not in self.entries)
        if res["applied"]:
            self.entries.add(entry)
            self.expected += amount

    @rule(amount=st.integers(1, 5_000), ref=st.sampled_from("xy"))
    def debit(self, amount: int, ref: str) -> None:
        entry = f"{self.tenant}:debit:{ref}"
        res = self.run(self.svc.ledger.debit(self.tenant, amount, entry, kind="refund"))
        if entry in self.entries:
            assert not res["applied"]
            return
        self.entries.add(entry)
        taken = min(amount, self.expected)
        assert res["shortfall_micros"] == amount - taken
        self.expected -= taken

    @rule(target=requests, amount=st.integers(0, 3_000))
    def reserve(self, amount: int) -> str:
        r = rid()
        try:
            left = self.run(self.svc.ledger.reserve(self.tenant, r, amount, worker_id="wk_model"))
        except InsufficientFunds:
            assert amount > self.expected
            return r
        self.expected -= amount
        assert left == self.expected
        self.open[r] = amount
        return r

    @rule(r=requests, charge=st.integers(0, 6_000))
    def settle(self, r: str, charge: int) -> None:
        got = self.run(self.svc.ledger.settle(r, charge, usage()))
        if r in self.open:
            held = self.open.pop(r)
            charged = min(charge, self.expected + held)
            assert got == charged
            self.expected += held - charged
        elif r in self.swept:
            self.swept.discard(r)
            charged = min(charge, self.expected)
            assert got == charged
            self.expected -= charged
        else:
            assert got is None

    @rule(r=requests)
    def release(self, r: str) -> None:
        got = self.run(self.svc.ledger.release(r))
        if r in self.open:
            assert got == 0
            self.expected += self.open.pop(r)
        elif r in self.swept:
            self.swept.discard(r)
            assert got == 0
        else:
            assert got is None

    @rule()
    def sweep(self) -> None:
        released = self.run(self.svc.ledger.release_swept(list(self.open)))
        assert released == len(self.open)
        self.expected += sum(self.open.values())
        self.swept |= set(self.open)
        self.open.clear()

    @rule(n=st.integers(2, 12), amount=st.integers(1, 2_000), charge=st.integers(0, 2_000))
    def concurrent_burst(self, n: int, amount: int, charge: int) -> None:
        async def one() -> int:
            r = rid()
            try:
                await self.svc.ledger.reserve(self.tenant, r, amount)
            except InsufficientFunds:
                return 0
            await asyncio.sleep(0)
            return int(await self.svc.ledger.settle(r, charge) or 0)

        async def burst() -> list[int]:
            return list(await asyncio.gather(*(one() for _ in range(n))))

        self.expected -= sum(self.run(burst()))

    @invariant()
    def balance_matches_model_and_ledger(self) -> None:
        assert self.expected >= 0
        assert self.run(self.svc.ledger.balance(self.tenant)) == self.expected
        assert self.run(self.svc.ledger.verify(HOUR_MS)) == []


def _run_machine(cfg: Config, examples: int, steps: int) -> None:
    loop = asyncio.new_event_loop()
    try:
        svc = build(cfg)
        if svc.store.is_sqlite:
            loop.run_until_complete(svc.store.migrate())
        LedgerMachine.svc = svc
        LedgerMachine.run = loop.run_until_complete
        run_state_machine_as_test(LedgerMachine, settings=settings(
            max_examples=examples, stateful_step_count=steps, deadline=None,
            suppress_health_check=[HealthCheck.too_slow]))
        loop.run_until_complete(svc.close())
    finally:
        loop.close()


def test_state_machine_keeps_the_invariants_on_sqlite(make_config: Callable[..., Config]) -> None:
    _run_machine(make_config(), examples=30, steps=25)


def test_state_machine_keeps_the_invariants_on_postgres(make_config: Callable[..., Config]) -> None:
    with fresh_pg_database() as url:
        _run_machine(make_config(database={"url": url}), examples=10, steps=20)
