"""Wallets and the ledger: idempotent entries, no overspend under concurrency, verify,
the sweep's release and the late settle, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tests.conftest import REDIS_URL, ServerThread, free_port, fresh_pg_database, need_redis
from tests.fakes.harness import PROVIDER_KEY, fake_models, start_gateway
from tests.fakes.openai_upstream import FakeOpenAI
from tollway.cli import main as cli_main
from tollway.config import Config
from tollway.errors import InsufficientFunds, SpendLimitExceeded
from tollway.services import Services, build
from tollway.store.schema import key_spend, ledger_entries, reservations, usage_events, wallets

HOUR_MS = 3_600_000


@pytest.fixture
async def committed(make_config: Callable[..., Config], backend: dict[str, Any]) -> AsyncIterator[Services]:
    """Holds committed to the database (PostgreSQL; SQLite served by several workers)."""
    s = build(make_config(**backend))
    if s.store.is_sqlite:
        await s.store.migrate()
    yield s
    await s.close()


@pytest.fixture(params=["sqlite-committed", "sqlite-in-memory", "postgresql"])
async def svc(request: pytest.FixtureRequest, make_config: Callable[..., Config],
              tmp_path: Path) -> AsyncIterator[Services]:
    """The three ways a ledger holds money: committed on SQLite (`serve --workers N`), in
    the one serving process's memory on SQLite (the embedded default), committed on
    PostgreSQL."""
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            need_redis()
            url = stack.enter_context(fresh_pg_database())
            s = build(make_config(database={"url": url}, cache={"url": REDIS_URL}))
        else:
            s = build(make_config(database={"url": f"sqlite:///{tmp_path / 'tollway.db'}"}),
                      sole_server=request.param == "sqlite-in-memory")
            await s.store.migrate()
        yield s
        await s.close()


def in_memory(svc: Services) -> bool:
    return svc.ledger.holds is not None


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
    await svc.ledger.flush()  # charges journaled by this process (ledger/journal.py) into the tables
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
    assert await count(svc, reservations) == 0 and svc.ledger.held_in_memory() == []
    kinds = sorted(e["kind"] for e in await svc.ledger.entries(tid))
    assert kinds == request_kinds(svc)
    assert await svc.ledger.verify(HOUR_MS) == []


def request_kinds(svc: Services) -> list[str]:
    """The entries one charged request leaves: a hold in memory leaves none of its own."""
    return ["credit", "debit"] if svc.ledger.holds is not None else ["credit", "debit", "release", "reserve"]


async def test_reserve_and_settle_are_one_transaction_each(svc: Services) -> None:
    """...and with the hold in memory, the reserve writes nothing: one transaction per request."""
    tid = await new_tenant(svc, 1_000_000)
    r = rid()
    statements, writer = svc.store.queries, svc.store.writer
    transactions = writer.transactions if writer else 0
    assert await svc.ledger.reserve(tid, r, 400_000, key_id="key_x", worker_id="wk_x") == 600_000
    if svc.ledger.holds is not None:
        assert writer is not None and writer.transactions == transactions
        assert await svc.ledger.balance(tid) == 600_000
        assert (await svc.ledger.wallet(tid))["reserved_micros"] == 400_000
    assert await svc.ledger.settle(r, 1_234, usage("key_x")) == 1_234
    if svc.ledger.journal is not None:
        # Journaled (ledger/journal.py): no transaction of its own; the flush applies it in one shared one.
        assert writer is not None and writer.transactions == transactions
        assert await svc.ledger.balance(tid) == 1_000_000 - 1_234
        await svc.ledger.flush()
    if writer is not None:
        assert writer.transactions - transactions == (1 if svc.ledger.holds is not None else 2)
    else:
        # PostgreSQL: one statement each, no BEGIN/COMMIT round trips (ledger/postgres.py)
        assert svc.store.queries - statements == 2
    assert await svc.ledger.balance(tid) == 1_000_000 - 1_234
    assert (await svc.ledger.wallet(tid))["reserved_micros"] == 0
    assert sorted(e["kind"] for e in await svc.ledger.entries(tid)) == request_kinds(svc)
    assert await count(svc, usage_events, usage_events.c.request_id == r) == 1
    assert await count(svc, reservations) == 0
    assert await svc.ledger.verify(HOUR_MS) == []


async def test_a_request_id_is_reserved_once(svc: Services) -> None:
    tid = await new_tenant(svc, 1_000_000)
    r = rid()
    await svc.ledger.reserve(tid, r, 100_000)
    with pytest.raises(ValueError if svc.ledger.holds is not None else sa.exc.IntegrityError):
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
    limit: dict[str, Any] = {"key_id": key["key_id"], "key_limit_micros": 500_000, "key_period": "2026-11-28"}

    async def attempt() -> str:
        try:
            await svc.ledger.reserve(tid, rid(), 100_000, **limit)
        except SpendLimitExceeded as exc:
            assert exc.status == 429 and "spend limit of 0.500000 USD" in exc.message
            return "429"
        return "ok"

    outcomes = await asyncio.gather(*(attempt() for _ in range(30)))
    assert outcomes.count("ok") == 5
    assert await svc.ledger.balance(tid) == 100_000_000 - 500_000  # refused holds took nothing
    # Settling below the hold frees the difference for the key's next requests.
    open_ids = await svc.ledger.open_requests(tid)
    assert len(open_ids) == 5
    for r in open_ids:
        await svc.ledger.settle(r, 40_000)
    await svc.ledger.flush()
    async with svc.store.read() as conn:
        spent = (await conn.execute(sa.select(key_spend.c.spent_micros))).scalar_one()
    assert spent == 5 * 40_000
    await svc.ledger.reserve(tid, rid(), 300_000, **limit)
    with pytest.raises(SpendLimitExceeded):
        await svc.ledger.reserve(tid, rid(), 1, **limit)
    # Another period starts from zero.
    await svc.ledger.reserve(tid, rid(), 500_000, **{**limit, "key_period": "2026-11-29"})
    assert await svc.ledger.verify(HOUR_MS) == []


# --- the sweep and the late settle ---------------------------------------------------------------


async def test_swept_reservation_is_released_then_a_late_settle_charges_once(committed: Services) -> None:
    svc = committed
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


async def test_verify_names_the_tenant_on_any_mismatch(committed: Services) -> None:
    svc = committed
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
        if self.svc.ledger.holds is not None:  # the sweep is for committed holds of dead workers
            assert released == 0
            return
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


def _run_machine(cfg: Config, examples: int, steps: int, sole_server: bool = False) -> None:
    loop = asyncio.new_event_loop()
    try:
        svc = build(cfg, sole_server=sole_server)
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


def test_state_machine_keeps_the_invariants_with_holds_in_memory(make_config: Callable[..., Config]) -> None:
    _run_machine(make_config(), examples=30, steps=25, sole_server=True)


def test_state_machine_keeps_the_invariants_on_postgres(make_config: Callable[..., Config]) -> None:
    with fresh_pg_database() as url:
        _run_machine(make_config(database={"url": url}), examples=10, steps=20)


# --- over HTTP: the chat endpoint -----------------------------------------------------------------

CHAT_BODY = {"model": "acme/sleep", "messages": [{"role": "user", "content": "Hold the line"}], "max_tokens": 64}


@pytest.mark.slow
def test_200_concurrent_chat_requests_against_a_wallet_covering_20(
        make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread], backend: dict[str, Any]) -> None:
    """All 200 arrive while the first holds are still open (the upstream answers after 6 s;
    this test's client shares the process with the gateway and needs ~4 s for 200 requests
    on a slow machine): exactly the 20 the wallet covers are forwarded, the rest get 402."""
    fake = FakeOpenAI(PROVIDER_KEY, stall_seconds=6.0)
    gw = start_gateway(make_config, serve_app, serve_app(fake.app).url, **backend)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the hold, read while the probe waits upstream
        probe_call = pool.submit(httpx.post, gw.url + "/v1/chat/completions", json=CHAT_BODY, timeout=30,
                                 headers={"authorization": f"Bearer {gw.key}"})
        deadline = time.monotonic() + 5
        while (hold := gw.held()) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        probe = probe_call.result()
    assert probe.status_code == 200, probe.text
    assert hold > 0 and gw.held() == 0

    async def fund(s: Services) -> tuple[str, str]:
        tid = str((await s.tenants.create("Bo"))["tenant_id"])
        key = await s.keys.create(tid)
        await s.ledger.credit(tid, 20 * hold, "fund-20")
        return tid, str(key["key"])

    tid, key = gw.run(fund)
    forwarded_before = len(fake.requests)

    async def storm() -> list[tuple[int, float, str]]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=gw.url, timeout=60, limits=limits) as client:
            started = time.monotonic()

            async def one() -> tuple[int, float, str]:
                r = await client.post("/v1/chat/completions", json=CHAT_BODY,
                                      headers={"authorization": f"Bearer {key}"})
                return r.status_code, time.monotonic() - started, r.headers.get("x-request-id", "")

            return list(await asyncio.gather(*(one() for _ in range(200))))

    results = asyncio.run(storm())
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 402]
    assert len(ok) + len(refused) == 200, Counter(r[0] for r in results)
    first_ok = min(t for _, t, _ in ok)
    assert max(t for _, t, _ in refused) < first_ok, "the machine is too slow for this test's premise"
    assert len(ok) == 20
    assert len(fake.requests) - forwarded_before == 20  # nothing forwarded without a hold

    async def final(s: Services) -> tuple[int, list[str], int]:
        debits = await count(s, ledger_entries, ledger_entries.c.tenant_id == tid, ledger_entries.c.kind == "debit")
        return await s.ledger.balance(tid), await s.ledger.verify(HOUR_MS), debits

    balance, problems, debits = gw.on_server(final)  # the gateway's own view: its journaled charges too
    assert balance >= 0 and problems == [] and debits == 20


# --- SIGKILL in the middle of requests ---------------------------------------------------------------


def _serve(cfg: Config, port: int, workers: int = 1) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FAKE_PROVIDER_KEY": PROVIDER_KEY}
    log = Path(cfg.source).with_suffix(f".{port}.log")
    with log.open("ab") as out:  # a session of its own: killpg reaches every worker
        proc = subprocess.Popen([sys.executable, "-m", "tollway", "serve", "--config", cfg.source,
                                 "--port", str(port), "--workers", str(workers)], env=env, stdout=out, stderr=out,
                                start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("tollway serve did not become ready")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["one-process-holds-in-memory", "two-workers-holds-committed"])
def test_sigkill_mid_requests_then_restart_leaves_a_clean_ledger(
        make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread], workers: int) -> None:
    """One process keeps its holds in memory: they die with it and nothing needs
    releasing. Two workers commit theirs: the next start-up sweeps them. Either way every
    answer the client saw is charged once, and nothing else is."""
    fake = FakeOpenAI(PROVIDER_KEY, stall_seconds=60)
    upstream = serve_app(fake.app)
    port = free_port()
    cfg = make_config(server={"port": port}, models=fake_models(), providers={
        "fake": {"type": "openai", "base_url": upstream.url + "/v1", "api_key_env": "FAKE_PROVIDER_KEY"},
        "echo": {"type": "echo"}})
    credit = 50_000_000

    async def setup(s: Services) -> tuple[str, str]:
        await s.store.migrate()
        tid = str((await s.tenants.create("Ada"))["tenant_id"])
        key = await s.keys.create(tid)
        await s.ledger.credit(tid, credit, "fund")
        return tid, str(key["key"])

    tid, key = _run(cfg, setup)
    proc = _serve(cfg, port, workers)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    auth = {"authorization": f"Bearer {key}"}
    answered: list[str] = []  # request ids the client got a 200 for
    killed = asyncio.Event()

    async def traffic() -> None:
        async with httpx.AsyncClient(timeout=90) as client:
            async def hang() -> None:  # held open by the upstream until the kill
                with contextlib.suppress(httpx.TransportError):
                    await client.post(url, headers=auth, json=CHAT_BODY)

            async def quick(n: int) -> None:
                while not killed.is_set():
                    body = {"model": "demo/echo", "messages": [{"role": "user", "content": f"n{n}"}],
                            "stream": n % 2 == 0, "stream_options": {"include_usage": True}}
                    try:
                        r = await client.post(url, headers=auth, json=body)
                    except httpx.TransportError:
                        continue
                    if r.status_code == 200:
                        answered.append(r.headers["x-request-id"])

            async def killer() -> None:
                deadline = time.monotonic() + 30
                while (len(fake.requests) < 8 or len(answered) < 30) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                os.killpg(proc.pid, signal.SIGKILL)  # echo traffic is mid-flight too
                await asyncio.to_thread(proc.wait)
                killed.set()

            tasks = [asyncio.create_task(hang()) for _ in range(8)]
            await asyncio.gather(killer(), *(quick(n) for n in range(6)))
            await asyncio.gather(*tasks)

    asyncio.run(traffic())
    assert proc.returncode == -signal.SIGKILL
    assert len(answered) >= 30 and len(fake.requests) >= 8

    async def open_now(s: Services) -> int:
        return await count(s, reservations)

    if workers == 1:
        assert _run(cfg, open_now) == 0  # the holds lived in the killed process only
    else:
        assert _run(cfg, open_now) >= 8  # the hanging requests' committed holds outlived the workers
    second = _serve(cfg, port, workers)  # ready only after the start-up sweep
    try:
        async def after(s: Services) -> tuple[int, list[tuple[str, str, int]], int]:
            async with s.store.read() as conn:
                rows = (await conn.execute(sa.select(ledger_entries.c.reference, ledger_entries.c.kind,
                                                     ledger_entries.c.amount_micros)
                                           .where(ledger_entries.c.tenant_id == tid))).all()
            return await count(s, reservations), [tuple(r) for r in rows], await s.ledger.balance(tid)

        still_open, entries, balance = _run(cfg, after)
        assert still_open == 0
        verify = subprocess.run([sys.executable, "-m", "tollway", "ledger", "verify", "--config", cfg.source],
                                capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        debits: dict[str, int] = {}
        for ref, kind, _ in entries:
            if kind == "debit":
                debits[ref] = debits.get(ref, 0) + 1
        assert all(n == 1 for n in debits.values())  # no request charged twice
        assert set(answered) <= set(debits)  # every answer the client saw was charged
        assert len(debits) <= len(answered) + 6  # at most the echo requests in flight at the kill besides
        if workers == 1:
            assert {kind for _, kind, _ in entries} == {"credit", "debit"}
        else:
            swept = [ref for ref, kind, _ in entries if kind == "release" and ref not in debits]
            assert len(swept) >= 8  # the requests whose outcome was never seen: released, not charged
        assert balance == credit + sum(a for _, kind, a in entries if kind == "debit")
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(timeout=30)
    logged = "".join(p.read_text() for p in Path(cfg.source).parent.glob("*.log"))
    assert ("startup_sweep" in logged) == (workers > 1)  # logged when it released something
    assert key not in logged and not re.search(r"ak_[A-Za-z0-9_-]{8,}", logged)


def _run(cfg: Config, fn: Callable[[Services], Any]) -> Any:
    async def go() -> Any:
        s = build(cfg)
        try:
            return await fn(s)
        finally:
            await s.close()

    return asyncio.run(go())
