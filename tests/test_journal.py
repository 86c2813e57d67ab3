"""The charge journal (journal.py): a settle appends one line; a flush applies the lines in
one transaction; a crash leaves files the next start-up applies, each charge once."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable

import sqlalchemy as sa

from tests.test_holds import _commit_will_fail
from tests.test_holds import svc as svc  # the sole server's services, holds in memory
from tests.test_ledger import new_tenant, rid, usage
from tollway.config import Config
from tollway.journal import JournalFiles
from tollway.services import Services, build
from tollway.store.schema import ledger_entries, usage_events


async def _rows(svc: Services, request_id: str) -> tuple[int, int]:
    async with svc.store.read() as conn:
        debits = (await conn.execute(sa.select(sa.func.count()).select_from(ledger_entries)
                                     .where(ledger_entries.c.reference == request_id,
                                            ledger_entries.c.kind == "debit"))).scalar_one()
        used = (await conn.execute(sa.select(sa.func.count()).select_from(usage_events)
                                   .where(usage_events.c.request_id == request_id))).scalar_one()
    return int(debits), int(used)


async def test_a_settle_is_journaled_at_once_and_applied_by_the_flush(svc: Services) -> None:
    assert svc.ledger.journal is not None and svc.store.writer is not None
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
    await asyncio.sleep(0.2)  # the flush timer
    assert await _rows(svc, r) == (1, 1) and files.leftovers() == []
    assert svc.ledger.unapplied(tid) == 0 and await svc.ledger.balance(tid) == 1_000_000 - 1_234
    assert await svc.ledger.settle(r, 1_234, usage()) is None  # a replay charges nothing
    assert await svc.ledger.verify(3_600_000) == []


async def test_a_flush_whose_commit_fails_keeps_its_charges_for_the_next(svc: Services) -> None:
    assert svc.ledger.journal is not None and svc.store.writer is not None
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
    first.ledger.journal = None
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
