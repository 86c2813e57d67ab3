"""The charge journal when something goes wrong (journal.py): a charge the ledger refuses
is set aside, never blocking the others or a start-up; a failed append leaves no partial
line for the next charge; two workers recovering the same files apply each charge once."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.test_holds import svc as svc  # the sole server's services, holds in memory
from tests.test_journal import _rows
from tests.test_ledger import new_tenant, rid, usage
from tollway.config import Config
from tollway.errors import NotFound
from tollway.ledger import journal as journal_mod
from tollway.ledger.journal import Charge, JournalFiles
from tollway.ledger.set_aside import resolve
from tollway.services import Services, build
from tollway.store.schema import set_aside_charges, usage_events

ABSURD = 2**63  # a count no 64-bit column holds


def _poison() -> dict[str, Any]:
    return {**usage(), "completion_tokens": ABSURD}


async def test_a_charge_the_ledger_refuses_is_set_aside_and_the_others_apply(svc: Services) -> None:
    a, b = await new_tenant(svc, 1_000_000), await new_tenant(svc, 1_000_000)
    bad, good_a, good_b = rid(), rid(), rid()
    for tid, r in ((a, bad), (a, good_a), (b, good_b)):
        await svc.ledger.reserve(tid, r, 100_000)
    assert await svc.ledger.settle(bad, 7_000, _poison()) == 7_000
    assert await svc.ledger.settle(good_a, 1_000, usage()) == 1_000
    assert await svc.ledger.settle(good_b, 2_000, usage()) == 2_000
    await svc.ledger.flush()  # raised OverflowError before, and kept every charge pending
    assert await _rows(svc, good_a) == (1, 1) and await _rows(svc, good_b) == (1, 1)
    assert await _rows(svc, bad) == (0, 0)
    assert svc.ledger.unapplied(a) == 0 and svc.ledger.unapplied(b) == 0
    assert svc.ledger.journal is not None and svc.ledger.journal.files.leftovers() == []
    assert await svc.ledger.balance(a) == 999_000 and await svc.ledger.balance(b) == 998_000
    problems = await svc.ledger.verify(3_600_000)
    assert len(problems) == 1 and bad in problems[0] and a in problems[0] and "0.007000" in problems[0], problems
    # Later charges of the same tenant are not held back by it either.
    later = rid()
    await svc.ledger.reserve(a, later, 100_000)
    assert await svc.ledger.settle(later, 500, usage()) == 500
    await asyncio.sleep(0.3)  # the flush timer
    assert await _rows(svc, later) == (1, 1) and await svc.ledger.balance(a) == 998_500


def _journal_by_hand(database: Path, charges: list[Charge]) -> None:
    files = JournalFiles(database)
    for charge in charges:
        files.append(charge.line())
    files.close()


async def test_a_start_up_sets_aside_what_it_cannot_apply_and_applies_the_rest(svc: Services) -> None:
    tid = await new_tenant(svc, 1_000_000)
    assert svc.store.sqlite_file is not None
    bad, good = rid(), rid()
    _journal_by_hand(svc.store.sqlite_file, [Charge(bad, tid, 9_000, None, _poison(), 1),
                                             Charge(good, tid, 3_000, None, usage(), 2)])
    assert await svc.ledger.recover_charges() == 1  # raised OverflowError before: `serve` exited 3
    assert await _rows(svc, good) == (1, 1) and await _rows(svc, bad) == (0, 0)
    assert await svc.ledger.balance(tid) == 997_000
    assert svc.ledger.journal is not None and svc.ledger.journal.files.leftovers() == []
    problems = await svc.ledger.verify(3_600_000)
    assert len(problems) == 1 and bad in problems[0], problems
    assert await svc.ledger.recover_charges() == 0
    # The operator decides: charge it now (once), and verify passes again.
    assert (await resolve(svc.ledger, bad, charge=True))["charged_usd"] == "0.009000"
    with pytest.raises(NotFound):
        await resolve(svc.ledger, bad, charge=True)
    assert await svc.ledger.balance(tid) == 988_000 and await svc.ledger.verify(3_600_000) == []


async def test_a_start_up_skips_a_line_whose_amount_no_charge_can_have(svc: Services) -> None:
    """Such a line (a corrupted file) once failed the start-up, or, negative, credited money."""
    tid = await new_tenant(svc, 1_000_000)
    assert svc.store.sqlite_file is not None
    good = rid()
    _journal_by_hand(svc.store.sqlite_file, [Charge(rid(), tid, 2**63, None, usage(), 1),
                                             Charge(rid(), tid, -50_000, None, usage(), 2),
                                             Charge(rid(), tid, 1.5, None, usage(), 3),  # type: ignore[arg-type]
                                             Charge(good, tid, 3_000, None, usage(), 4)])
    assert await svc.ledger.recover_charges() == 1
    assert await _rows(svc, good) == (1, 1) and await svc.ledger.balance(tid) == 997_000
    assert await svc.ledger.verify(3_600_000) == []


async def test_a_failed_append_leaves_no_partial_line_for_the_next_charge(
        svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    assert svc.ledger.journal is not None and svc.store.sqlite_file is not None
    tid = await new_tenant(svc, 1_000_000)
    first, second = rid(), rid()
    await svc.ledger.reserve(tid, first, 100_000)
    await svc.ledger.reserve(tid, second, 100_000)
    real_write = os.write
    calls = {"n": 0}

    def short_then_full_disk(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data)[:10])  # a short write: the kernel took part of the line
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_mod.os, "write", short_then_full_disk)
    # The append fails: this charge is settled in a transaction of its own instead.
    assert await svc.ledger.settle(first, 1_000, usage()) == 1_000
    monkeypatch.setattr(journal_mod.os, "write", real_write)
    assert svc.ledger.settle_at_once(second, 2_000, usage()) == 2_000
    # The process dies before the flush: what a start-up would read must hold the second charge.
    journal = svc.ledger.journal
    if journal._timer is not None:
        journal._timer.cancel()
        journal._timer = None
    read = [c.request_id for p in journal.files.leftovers() for c in JournalFiles.read(p)[0]]
    assert read == [second]
    assert all(JournalFiles.read(p)[1] == 0 for p in journal.files.leftovers())  # no torn line either
    await svc.ledger.flush()
    assert await _rows(svc, first) == (1, 1) and await _rows(svc, second) == (1, 1)
    assert await svc.ledger.verify(3_600_000) == []


def test_two_workers_recovering_the_same_files_apply_each_charge_once(
        make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --workers N`: every worker recovers at start-up. The second lists the files
    the first then applies and deletes: it must neither fail nor apply anything again."""
    cfg = make_config()
    setup = build(cfg)
    charges: list[Charge] = []

    async def prepare() -> str:
        await setup.store.migrate()
        tid = await new_tenant(setup, 1_000_000)
        assert setup.store.sqlite_file is not None
        for n in range(3):
            charges.append(Charge(rid(), tid, 1_000 * (n + 1), None, usage(), n))
            _journal_by_hand(setup.store.sqlite_file, [charges[-1]])
            JournalFiles(setup.store.sqlite_file).close()
        await setup.close()
        return tid

    tid = asyncio.run(prepare())
    second_listed, first_done = threading.Event(), threading.Event()
    real_leftovers, real_read = JournalFiles.leftovers, JournalFiles.read

    def leftovers(self: JournalFiles) -> list[Path]:
        found = real_leftovers(self)
        if threading.current_thread().name == "second":
            second_listed.set()
        return found

    def read(path: Path) -> tuple[list[Charge], int]:
        if threading.current_thread().name == "first":
            second_listed.wait(2)  # (a lock may keep the second from listing at all)
        else:
            first_done.wait(5)  # (if the second holds a lock the first waits for, this times out)
        return real_read(path)

    monkeypatch.setattr(JournalFiles, "leftovers", leftovers)
    monkeypatch.setattr(JournalFiles, "read", staticmethod(read))
    results: dict[str, Any] = {}

    def worker(name: str) -> None:
        async def run() -> int:
            s = build(cfg)
            try:
                return await s.ledger.recover_charges()
            finally:
                await s.close()
        try:
            results[name] = asyncio.run(run())
        except BaseException as exc:
            results[name] = exc
        finally:
            if name == "first":
                first_done.set()

    threads = [threading.Thread(target=worker, args=(n,), name=n) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results.values()) == [0, 3], results  # (either may take a lock first)

    async def check() -> None:
        s = build(cfg)
        try:
            for c in charges:
                assert await _rows(s, c.request_id) == (1, 1)
            async with s.store.read() as conn:
                assert (await conn.execute(sa.select(sa.func.count()).select_from(usage_events))).scalar_one() == 3
            assert await s.ledger.balance(tid) == 1_000_000 - 6_000
            assert await s.ledger.verify(3_600_000) == []
        finally:
            await s.close()

    asyncio.run(check())


async def test_a_tenant_deletion_pseudonymises_its_set_aside_charges(svc: Services) -> None:
    tid = await new_tenant(svc, 1_000_000)
    bad = rid()
    await svc.ledger.reserve(tid, bad, 100_000, key_id="key_secret1", key_limit_micros=500_000, key_period="2026-12")
    assert await svc.ledger.settle(bad, 4_000, {**_poison(), "key_id": "key_secret1"}) == 4_000
    await svc.ledger.flush()
    result = await svc.tenants.delete(tid)
    assert result["already_deleted"] is False
    async with svc.store.read() as conn:
        rows = [dict(r) for r in (await conn.execute(sa.select(set_aside_charges))).mappings()]
    assert len(rows) == 1
    text = repr(rows[0])
    assert tid not in text and bad not in text and "key_secret1" not in text
    assert rows[0]["tenant_id"].startswith("tn_anon_") and rows[0]["request_id"].startswith("req_anon_")
    assert Charge.parse(rows[0]["charge"].encode()) is not None
    # Still resolvable against the wallet the deletion moved (the balance the operator refunds).
    assert (await resolve(svc.ledger, rows[0]["request_id"], charge=True))["charged_usd"] == "0.004000"
    assert await svc.ledger.verify(3_600_000) == []


async def test_a_charge_the_journal_cannot_encode_leaves_its_hold_to_the_sweep(svc: Services) -> None:
    """A value no JSON line holds (an int beyond 64 bits) must not leave the hold claimed
    for ever, where the sweep's backstop never releases it."""
    assert svc.ledger.holds is not None
    tid = await new_tenant(svc, 1_000_000)
    r = rid()
    await svc.ledger.reserve(tid, r, 100_000)
    huge = {**usage(), "completion_tokens": 2**64}
    assert svc.ledger.settle_at_once(r, 1_000, huge) is None
    with pytest.raises(OverflowError):
        await svc.ledger.settle(r, 1_000, huge)
    assert svc.ledger.holds.older_than(-1_000) == [r]  # claimable again: the sweep releases it
    assert await svc.ledger.release_stale_in_memory(-1_000) == 1
    assert await svc.ledger.balance(tid) == 1_000_000 and await svc.ledger.verify(3_600_000) == []
