"""The charge journal (ledger/journal.py): a settle appends one line; a flush applies the lines in
one transaction; a crash leaves files the next start-up applies, each charge once."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from tests.test_holds import _commit_will_fail
from tests.test_holds import svc as svc  # the sole server's services, holds in memory
from tests.test_ledger import new_tenant, rid, usage
from tollway.config import Config
from tollway.ledger import journal as journal_mod
from tollway.ledger.journal import JournalFiles
from tollway.services import Services, build
from tollway.store.schema import key_spend, ledger_entries, usage_events, wallets


async def _rows(svc: Services, request_id: str) -> tuple[int, int]:
    async with svc.store.read() as conn:
        debits = (await conn.execute(sa.select(sa.func.count()).select_from(ledger_entries)
                                     .where(ledger_entries.c.reference == request_id,
                                            ledger_entries.c.kind == "debit"))).scalar_one()
        used = (await conn.execute(sa.select(sa.func.count()).select_from(usage_events)
                                   .where(usage_events.c.request_id == request_id))).scalar_one()
    return int(debits), int(used)


async def test_a_settle_is_journaled_at_once_and_applied_by_the_flush(svc: Services,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert svc.ledger.journal is not None and svc.store.writer is not None
    # A timer long enough that this loaded machine reads the tables before it fires.
    monkeypatch.setattr(journal_mod, "FLUSH_SECONDS", 1.0)
    tid = await new_tenant(svc, 1_000_000)
    r = rid()
    await svc.ledger.reserve(tid, r, 400_000)
    before = svc.store.writer.transactions
    assert await svc.ledger.settle(r, 1_234, usage()) == 1_234
    assert svc.store.writer.transactions == before  # no transaction of its own
    assert await svc.ledger.balance(tid) == 1_000_000 - 1_234  # deducted while not yet applied
    assert svc.ledger.held_in_memory() == [] and svc.ledger.unapplied(tid) == 1
    files = svc.ledger.journal.files
    assert [len(JournalFiles.read(p)[0]) for p in files.leftovers()] == [1]
    assert await _rows(svc, r) == (0, 0)
    for _ in range(100):  # the flush timer
        if await _rows(svc, r) == (1, 1):
            break
        await asyncio.sleep(0.05)
    assert await _rows(svc, r) == (1, 1) and files.leftovers() == []
    assert svc.ledger.unapplied(tid) == 0 and await svc.ledger.balance(tid) == 1_000_000 - 1_234
    assert await svc.ledger.settle(r, 1_234, usage()) is None  # a replay charges nothing
    assert await svc.ledger.verify(3_600_000) == []


async def test_a_flush_whose_commit_fails_keeps_its_charges_for_the_next(svc: Services,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert svc.ledger.journal is not None and svc.store.writer is not None
    monkeypatch.setattr(journal_mod, "FLUSH_SECONDS", 60.0)  # only this test's flushes run
    tid = await new_tenant(svc, 1_000_000)
    r = rid()
    await svc.ledger.reserve(tid, r, 300_000)
    assert await svc.ledger.settle(r, 100_000, usage()) == 100_000
    bad = _commit_will_fail(svc)
    outcome = await asyncio.gather(svc.store.writer.run(bad), svc.ledger.flush(), return_exceptions=True)
    assert all(isinstance(o, sa.exc.IntegrityError) for o in outcome), outcome
    assert await _rows(svc, r) == (0, 0) and svc.ledger.unapplied(tid) == 1
    assert await svc.ledger.balance(tid) == 900_000 and svc.ledger.journal.files.leftovers()
    await svc.ledger.flush()
    assert await _rows(svc, r) == (1, 1) and svc.ledger.journal.files.leftovers() == []
    assert await svc.ledger.balance(tid) == 900_000 and await svc.ledger.verify(3_600_000) == []


async def test_a_crash_leaves_charges_the_next_start_applies_once(make_config: Callable[..., Config]) -> None:
    cfg = make_config()
    first = build(cfg, sole_server=True)
    await first.store.migrate()
    tid = await new_tenant(first, 1_000_000)
    charged = []
    for _ in range(3):
        r = rid()
        await first.ledger.reserve(tid, r, 100_000)
        charged.append((r, await first.ledger.settle(r, 10_000 + len(charged), usage())))
    # The process dies: no flush, no close of the ledger.
    journal = first.ledger.journal
    assert journal is not None and journal._timer is not None
    journal._timer.cancel()
    paths = journal.files.leftovers()
    kept = [p.with_name(p.name + ".copy") for p in paths]
    for p, k in zip(paths, kept, strict=True):
        shutil.copy(p, k)
    journal.files.close()
    first.ledger.memory.journal = None
    await first.close()

    second = build(cfg, sole_server=True)
    try:
        assert await second.ledger.recover_charges() == 3
        for r, amount in charged:
            assert amount is not None and await _rows(second, r) == (1, 1)
        total = sum(a for _, a in charged if a)
        assert await second.ledger.balance(tid) == 1_000_000 - total
        assert await second.ledger.recover_charges() == 0  # the files are gone
        # Died after the COMMIT, before deleting its files: each charge is still applied once.
        for p, k in zip(paths, kept, strict=True):
            k.rename(p)
        with open(paths[-1], "ab") as f:
            f.write(b'["req_torn", "tn_x", 5')  # a line a power loss cut short
        assert await second.ledger.recover_charges() == 0
        assert await second.ledger.balance(tid) == 1_000_000 - total
        assert second.ledger.journal is not None and second.ledger.journal.files.leftovers() == []
        assert await second.ledger.verify(3_600_000) == []
    finally:
        await second.close()


async def _debits(svc: Services, tenant_id: str) -> list[tuple[str, int, int]]:
    async with svc.store.read() as conn:
        rows = await conn.execute(sa.select(ledger_entries.c.reference, ledger_entries.c.amount_micros,
                                            ledger_entries.c.balance_after_micros)
                                  .where(ledger_entries.c.tenant_id == tenant_id, ledger_entries.c.kind == "debit"))
        return [(r[0], -int(r[1]), int(r[2])) for r in rows]


async def test_a_flush_writes_each_charge_as_its_own_settle_would(svc: Services) -> None:
    """One wallet update and one insert per table for a tenant's charges, but the same rows
    as one settle each: every `:debit` entry with its own balance after, in order, key
    spend summed, a usage row per request (a zero charge too), whatever its columns."""
    a, b = await new_tenant(svc, 1_000_000), await new_tenant(svc, 500_000)
    period = "2026-12"
    charges = [1_000, 0, 2_500, 3_000, 700]
    requests = [rid() for _ in charges]
    for i, r in enumerate(requests):
        keyed = i % 2 == 0
        await svc.ledger.reserve(a, r, 100_000, key_id="key_x" if keyed else None,
                                 key_limit_micros=1_000_000 if keyed else None, key_period=period if keyed else None)
    still_open = rid()
    await svc.ledger.reserve(a, still_open, 50_000)
    other = rid()
    await svc.ledger.reserve(b, other, 100_000)
    for i, (r, amount) in enumerate(zip(requests, charges, strict=True)):
        row = usage("key_x" if i % 2 == 0 else None)
        if i == 3:
            del row["error_type"]  # a row with other columns than the rest
        assert await svc.ledger.settle(r, amount, row) == amount
    assert await svc.ledger.settle(other, 4_000, usage()) == 4_000
    assert svc.ledger.unapplied(a) == 5 and svc.ledger.unapplied(b) == 1
    await svc.ledger.flush()

    after, expected = 1_000_000, []
    for r, amount in zip(requests, charges, strict=True):
        after -= amount
        if amount:
            expected.append((r, amount, after))
    assert sorted(await _debits(svc, a)) == sorted(expected)
    assert await _debits(svc, b) == [(other, 4_000, 496_000)]
    async with svc.store.read() as conn:
        spent = (await conn.execute(sa.select(key_spend.c.spent_micros)
                                    .where(key_spend.c.key_id == "key_x", key_spend.c.period == period))).scalar()
        costs = dict((await conn.execute(sa.select(usage_events.c.request_id, usage_events.c.cost_micros)
                                         .where(usage_events.c.tenant_id == a))).all())
    assert spent == 1_000 + 2_500 + 700
    assert costs == dict(zip(requests, charges, strict=True))
    assert await svc.ledger.balance(a) == 1_000_000 - sum(charges) - 50_000  # the open hold stays held
    assert await svc.ledger.release(still_open) == 0
    assert await svc.ledger.verify(3_600_000) == []


async def test_a_flush_the_wallet_cannot_cover_whole_charges_each_capped_in_order(svc: Services) -> None:
    """A dispute debit committed between the settles and the flush (ledger/holds.py: the one race
    left) takes money the charges held: each is then charged on its own, never below zero."""
    tid = await new_tenant(svc, 100_000)
    requests = [rid() for _ in range(3)]
    for r in requests:
        await svc.ledger.reserve(tid, r, 30_000)
        assert await svc.ledger.settle(r, 30_000, usage()) == 30_000

    def racing_debit(conn: sa.Connection) -> None:
        conn.execute(wallets.update().where(wallets.c.tenant_id == tid)
                     .values(balance_micros=wallets.c.balance_micros - 50_000))
        conn.execute(ledger_entries.insert().values(id=f"dispute:{tid}", tenant_id=tid, kind="dispute",
                                                    amount_micros=-50_000, balance_after_micros=50_000,
                                                    reference=None, created_at=0))

    await svc.store.transact(racing_debit)
    await svc.ledger.flush()
    charged = {r: amount for r, amount, _ in await _debits(svc, tid)}
    # As settles one by one would: each may take only what the later ones do not hold.
    assert charged == {requests[1]: 20_000, requests[2]: 30_000}
    assert await svc.ledger.balance(tid) == 0 and await svc.ledger.verify(3_600_000) == []


async def test_settle_at_once_journals_in_the_same_step_or_leaves_the_settle_to_settle(svc: Services) -> None:
    # The pipeline's common settle (Ledger.settle_at_once) awaits nothing; where it cannot
    # journal, it must leave the hold exactly as `settle` needs it, charged nowhere.
    assert svc.ledger.journal is not None and svc.store.writer is not None
    tid = await new_tenant(svc, 1_000_000)
    first, second = rid(), rid()
    await svc.ledger.reserve(tid, first, 200_000)
    await svc.ledger.reserve(tid, second, 200_000)
    assert svc.ledger.settle_at_once(first, 1_000, usage()) == 1_000
    assert svc.ledger.settle_at_once(first, 1_000, usage()) is None  # claimed already: not twice
    assert await svc.ledger.settle(first, 1_000, usage()) is None
    assert svc.ledger.settle_at_once(rid(), 1_000, usage()) is None  # never reserved

    files = svc.ledger.journal.files

    def disk_full(_: bytes) -> None:
        raise OSError(28, "No space left on device")

    real_append, files.append = files.append, disk_full  # type: ignore[method-assign]
    try:
        assert svc.ledger.settle_at_once(second, 2_000, usage()) is None
        assert svc.ledger.held_in_memory() == [second]  # still held, and claimable again
        before = svc.store.writer.transactions
        assert await svc.ledger.settle(second, 2_000, usage()) == 2_000  # committed in its own transaction
        assert svc.store.writer.transactions == before + 1
    finally:
        files.append = real_append  # type: ignore[method-assign]
    await svc.ledger.flush()
    assert await _rows(svc, first) == (1, 1) and await _rows(svc, second) == (1, 1)
    assert await svc.ledger.balance(tid) == 1_000_000 - 3_000 and await svc.ledger.verify(3_600_000) == []
