"""Holds kept in memory by the one process serving an SQLite database (holds.py): the
lock that makes that process the only one, what a failed COMMIT does to a hold, the
sweep's backstop, and a tenant deleted while one of its requests holds money.
The ledger's own guarantees (idempotency, no overspend, key limits, the state machine)
run in this mode too: tests/test_ledger.py's `svc` fixture."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import free_port
from tests.test_ledger import new_tenant, rid, usage
from tollway.app import create_app
from tollway.config import Config
from tollway.holds import DatabaseInUse, ServingLock
from tollway.services import Services, build
from tollway.store.schema import ledger_entries, usage_events


@pytest.fixture
async def svc(make_config: Callable[..., Config]) -> AsyncIterator[Services]:
    s = build(make_config(), sole_server=True)
    await s.store.migrate()
    yield s
    await s.close()


# --- the lock -------------------------------------------------------------------------------------


def test_one_process_with_holds_in_memory_excludes_every_other_server(tmp_path: Path) -> None:
    db = tmp_path / "tollway.db"
    sole = ServingLock(db, exclusive=True)
    sole.acquire()
    for exclusive in (True, False):
        with pytest.raises(DatabaseInUse) as caught:
            ServingLock(db, exclusive=exclusive).acquire()
        assert "tollway.db" in str(caught.value) and str(tmp_path) not in str(caught.value)
    sole.release()
    workers = [ServingLock(db, exclusive=False) for _ in range(3)]
    for w in workers:  # `serve --workers 3`: they commit their holds and share the database
        w.acquire()
    with pytest.raises(DatabaseInUse, match="--workers"):
        ServingLock(db, exclusive=True).acquire()
    for w in workers:
        w.release()
    sole = ServingLock(db, exclusive=True)
    sole.acquire()
    sole.release()


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    db = tmp_path / "tollway.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from tollway.holds import ServingLock; "
         "lock = ServingLock(Path(sys.argv[1]), exclusive=True); lock.acquire(); print('held', flush=True); "
         "time.sleep(60)",
         str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(DatabaseInUse):
            ServingLock(db, exclusive=True).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    after = ServingLock(db, exclusive=True)
    after.acquire()  # nothing to clean up after a crash
    after.release()


async def test_a_second_serving_app_on_the_same_database_does_not_start(make_config: Callable[..., Config]) -> None:
    cfg = make_config()

    def app(sole: bool) -> Any:
        return create_app(cfg, provider_keys={}, sole_server=sole)

    first = app(True)
    async with first.router.lifespan_context(first):
        for sole in (True, False):
            second = app(sole)
            with pytest.raises(DatabaseInUse):
                async with second.router.lifespan_context(second):
                    pass
    # Workers that commit their holds share the database; a sole server then cannot join.
    a, b, sole_after = app(False), app(False), app(True)
    async with a.router.lifespan_context(a), b.router.lifespan_context(b):
        with pytest.raises(DatabaseInUse):
            async with sole_after.router.lifespan_context(sole_after):
                pass
    again = app(True)  # every lock went with its app's shutdown
    async with again.router.lifespan_context(again):
        pass


@pytest.mark.slow
def test_tollway_serve_refuses_to_start_beside_another(make_config: Callable[..., Config]) -> None:
    ports = [free_port(), free_port()]
    cfg = make_config()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    serve = [sys.executable, "-m", "tollway", "serve", "--config", cfg.source, "--port"]
    first = subprocess.Popen([*serve, str(ports[0])], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{ports[0]}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        second = subprocess.run([*serve, str(ports[1])], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "another Tollway process is serving from tollway.db" in second.stderr
        assert httpx.get(f"http://127.0.0.1:{ports[0]}/readyz", timeout=2).status_code == 200  # the first serves on
    finally:
        first.terminate()
        first.wait(timeout=30)


# --- a failed COMMIT, the backstop, a deletion ---------------------------------------------------------


def _commit_will_fail(svc: Services) -> Callable[[Any], None]:
    """A transaction whose statement succeeds and whose COMMIT fails: a deferred foreign
    key, checked by SQLite only at COMMIT. Run in the same batch, it rolls the batch back."""
    assert svc.store.writer is not None
    raw = svc.store.writer.read_now(lambda conn: conn.connection.driver_connection)
    raw.execute("PRAGMA foreign_keys = ON")
    raw.execute("CREATE TABLE IF NOT EXISTS t_parent (id INTEGER PRIMARY KEY)")
    raw.execute("CREATE TABLE IF NOT EXISTS t_child (id INTEGER PRIMARY KEY, parent INTEGER "
                "REFERENCES t_parent (id) DEFERRABLE INITIALLY DEFERRED)")
    return lambda conn: conn.connection.driver_connection.execute("INSERT INTO t_child (parent) VALUES (42)")


async def test_a_settle_rolled_back_at_commit_puts_its_hold_back_for_the_retry(svc: Services) -> None:
    """The settle in a transaction of its own: what the ledger does when the charge
    journal cannot be written (journal.py)."""
    assert svc.store.writer is not None and svc.ledger.holds is not None
    svc.ledger.memory.journal = None
    tid = await new_tenant(svc, 1_000_000)
    r, other = rid(), rid()
    await svc.ledger.reserve(tid, r, 300_000)
    await svc.ledger.reserve(tid, other, 200_000)
    bad = _commit_will_fail(svc)
    # Both enter the same batch (submitted in one turn of the loop); its COMMIT fails.
    outcome = await asyncio.gather(svc.store.writer.run(bad), svc.ledger.settle(r, 100_000, usage()),
                                   return_exceptions=True)
    assert all(isinstance(o, sa.exc.IntegrityError) for o in outcome), outcome
    assert svc.ledger.holds.held(tid) == 500_000 and await svc.ledger.balance(tid) == 500_000
    async with svc.store.read() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(usage_events))).scalar_one() == 0
    # The retry settles it, once.
    assert await svc.ledger.settle(r, 100_000, usage()) == 100_000
    assert await svc.ledger.settle(r, 100_000, usage()) is None
    assert svc.ledger.holds.held(tid) == 200_000 and await svc.ledger.balance(tid) == 700_000
    assert await svc.ledger.release(other) == 0
    assert await svc.ledger.balance(tid) == 900_000 and await svc.ledger.verify(3_600_000) == []


async def test_settles_in_one_batch_each_see_the_others_charged(svc: Services) -> None:
    """The charge beyond a hold may take free money only; within one COMMIT batch, a hold
    already charged is no longer held (it left memory with its charge)."""
    tid = await new_tenant(svc, 1_000)
    a, b, c = rid(), rid(), rid()
    for r in (a, b, c):
        await svc.ledger.reserve(tid, r, 300)
    charged = await asyncio.gather(svc.ledger.settle(a, 300), svc.ledger.settle(b, 500), svc.ledger.settle(c, 300))
    # a: its hold; b: its hold + the 100 nobody held (c's 300 was still held); c: its hold.
    assert charged == [300, 400, 300]
    assert await svc.ledger.balance(tid) == 0
    await svc.ledger.flush()
    assert await svc.ledger.balance(tid) == 0 and svc.ledger.holds is not None and len(svc.ledger.holds) == 0
    assert await svc.ledger.verify(3_600_000) == []


async def test_the_sweep_releases_a_hold_older_than_the_longest_request(svc: Services) -> None:
    assert svc.ledger.holds is not None
    tid = await new_tenant(svc, 1_000_000)
    stuck, fresh = rid(), rid()
    await svc.ledger.reserve(tid, stuck, 400_000)
    time.sleep(0.2)
    await svc.ledger.reserve(tid, fresh, 100_000)
    assert await svc.ledger.release_stale_in_memory(max_request_ms=100) == 1
    assert svc.ledger.held_in_memory() == [fresh] and await svc.ledger.balance(tid) == 900_000
    assert await svc.ledger.settle(fresh, 1_000) == 1_000
    await svc.ledger.flush()
    async with svc.store.read() as conn:
        kinds = (await conn.execute(sa.select(ledger_entries.c.kind).where(ledger_entries.c.tenant_id == tid))).all()
    assert sorted(k for (k,) in kinds) == ["credit", "debit"]
    # The process was only stalled and the request is answered now: charged, once, from
    # what nobody else holds (as a committed hold's late settle).
    assert await svc.ledger.settle(stuck, 350_000, usage()) == 350_000
    assert await svc.ledger.balance(tid) == 1_000_000 - 1_000 - 350_000
    assert await svc.ledger.settle(stuck, 1_000) is None
    await svc.ledger.flush()
    assert await svc.ledger.balance(tid) == 649_000 and await svc.ledger.verify(3_600_000) == []


async def test_deleting_a_tenant_releases_its_holds_in_memory(svc: Services) -> None:
    tid = await new_tenant(svc, 5_000_000)
    in_flight = rid()
    await svc.ledger.reserve(tid, in_flight, 1_000_000)
    result = await svc.tenants.delete(tid)
    assert result["reservations_released"] == 1 and result["balance_usd"] == "5.000000"
    assert svc.ledger.held_in_memory() == []
    # The request answers after the deletion: nothing is charged or recorded under any id.
    assert await svc.ledger.settle(in_flight, 700_000, usage()) is None
    async with svc.store.read() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(usage_events))).scalar_one() == 0
    assert await svc.ledger.verify(3_600_000) == []
