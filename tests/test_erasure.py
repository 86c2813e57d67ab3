"""Deletion that really erases: the database's own files hold nothing of a deleted tenant,
and nothing kept joins the record of the deletion to the pseudonymous books."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import _pg_run, fresh_pg_database
from tests.test_tenants import EMAIL, EXTERNAL, IP, NAME, OTHER_IP, log_row, populate, run, with_svc
from tollway.config import Config
from tollway.services import Services
from tollway.store.schema import access_log, deletion_requests, ledger_entries, tenants, wallets
from tollway.tenants import deletion_record_id


def erased_strings(seeded: dict[str, Any]) -> list[str]:
    """Everything of Ada's that must leave the files: the person, and every id that names her."""
    return [seeded["ada"], NAME, EMAIL, EXTERNAL, IP, "Ada's laptop", *seeded["rids"], seeded["in_flight"],
            *(k["key_id"] for k in seeded["keys"])]


def found_in(files: list[Path], needles: list[str]) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    for f in files:
        raw = f.read_bytes()
        for s in needles:
            if s.encode() in raw:
                hits.setdefault(s, []).append(f.name)
    return hits


async def pg_files(svc: Services) -> list[Path]:
    """Every file of this database's directory (tables, indexes, TOAST, maps, catalogs),
    after a CHECKPOINT has written the dirty pages out."""
    async with svc.store.engine.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await auto.exec_driver_sql("CHECKPOINT")
        data = Path((await auto.exec_driver_sql("SHOW data_directory")).scalar_one())
        oid = (await auto.exec_driver_sql(
            "SELECT oid FROM pg_database WHERE datname = current_database()")).scalar_one()
    base = data / "base" / str(oid)
    if not os.access(base, os.R_OK):
        pytest.skip(f"{base} is not readable by the test user (run as root or postgres to check the files)")
    return [p for p in base.iterdir() if p.is_file()]


def test_postgres_database_files_hold_nothing_of_the_deleted_tenant(make_config: Callable[..., Config]) -> None:
    with fresh_pg_database() as url:
        cfg = make_config(database={"url": url})
        seeded = run(with_svc(cfg, populate))
        needles = erased_strings(seeded)
        before = found_in(run(with_svc(cfg, pg_files)), needles)
        assert set(before) == set(needles)  # the check can fail: every one of them is in the files now
        result = run(with_svc(cfg, lambda s: s.tenants.delete(seeded["ada"])))
        assert result["files_scrubbed"] is True
        assert found_in(run(with_svc(cfg, pg_files)), needles) == {}
        after = found_in(run(with_svc(cfg, pg_files)), ["Bob Bystander", OTHER_IP, seeded["bob"]])
        assert set(after) == {"Bob Bystander", OTHER_IP, seeded["bob"]}  # the bystander's rows are intact


def sqlite_files(db: Path) -> list[Path]:
    return [p for p in db.parent.iterdir() if p.name.startswith(db.name)]


def test_sqlite_files_hold_nothing_of_the_deleted_tenant(make_config: Callable[..., Config]) -> None:
    cfg = make_config()
    db = Path(cfg.database.url.removeprefix("sqlite:///"))
    run(with_svc(cfg, lambda s: s.store.migrate()))
    seeded = run(with_svc(cfg, populate))
    needles = erased_strings(seeded)
    assert set(found_in(sqlite_files(db), needles)) == set(needles)
    out = subprocess.run([sys.executable, "-m", "tollway", "tenants", "delete", seeded["ada"], "--config",
                          cfg.source, "--json"], capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tenant_id"] == seeded["ada"]
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0  # checkpointed
    assert found_in(sqlite_files(db), needles) == {}
    assert set(found_in(sqlite_files(db), ["Bob Bystander", seeded["bob"]])) == {"Bob Bystander", seeded["bob"]}
    verify = subprocess.run([sys.executable, "-m", "tollway", "ledger", "verify", "--config", cfg.source, "--json"],
                            capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"] is True


async def _delete_several(svc: Services, n: int) -> list[str]:
    ids = []
    for i in range(n):
        tid = (await svc.tenants.create(f"Person {i}", f"p{i}@example.org"))["tenant_id"]
        await svc.ledger.credit_manual(tid, 1_000_000 * (i + 1), f"inv-{i}")
        ids.append(tid)
    ids.sort(key=deletion_record_id, reverse=True)  # deleted against the order of their records
    for tid in ids:
        await svc.tenants.delete(tid)
    return ids


async def _kept_rows(svc: Services) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The deletion records and the pseudonymous tenant and wallet rows, each in the order
    the database stores them (no ORDER BY: physical or rowid order is what a reader of the
    files sees)."""
    async with svc.store.read() as conn:
        records = [dict(r) for r in (await conn.execute(sa.select(deletion_requests))).mappings()]
        anon = [dict(r) for r in (await conn.execute(
            sa.select(tenants).where(tenants.c.id.like("tn_anon_%")))).mappings()]
        held = [dict(r) for r in (await conn.execute(
            sa.select(wallets).where(wallets.c.tenant_id.like("tn_anon_%")))).mappings()]
    return records, anon, held


@pytest.mark.timeout(300)  # six deletions, each rewriting ten tables on PostgreSQL
def test_no_value_or_order_joins_a_deletion_record_to_its_pseudonym(
        backend: dict[str, Any], make_config: Callable[..., Config]) -> None:
    cfg = make_config(**backend)
    run(with_svc(cfg, lambda s: s.store.migrate()))
    ids = run(with_svc(cfg, lambda s: _delete_several(s, 6)))
    records, anon, held = run(with_svc(cfg, _kept_rows))
    assert len(records) == len(anon) == len(held) == 6
    # The record keeps no original id, and only the UTC day of the request and completion.
    assert {r["tenant_id"] for r in records} == {deletion_record_id(t) for t in ids}
    day = 86_400_000
    for r in records:
        assert r["requested_at"] % day == 0 and r["completed_at"] % day == 0
    # No time in a record is a time of a pseudonymous tenant, wallet or ledger entry.
    record_times = {r[c] for r in records for c in ("requested_at", "completed_at")}
    anon_times = {t[c] for t in anon for c in ("created_at", "deletion_requested_at", "deleted_at")}
    anon_times |= {w["updated_at"] for w in held}

    async def entry_times(svc: Services) -> set[int]:
        async with svc.store.read() as conn:
            return set((await conn.execute(sa.select(ledger_entries.c.created_at)
                                           .where(ledger_entries.c.tenant_id.like("tn_anon_%")))).scalars())

    assert not record_times & (anon_times | run(with_svc(cfg, entry_times)))
    # Order: the records are stored in the order of their hashes, not in the order of the
    # deletions (the pseudonymous rows are appended in that order), so ranks cannot pair
    # them up. The deletions ran in reverse hash order: a table in deletion order fails.
    stored = [r["tenant_id"] for r in records]
    assert stored == sorted(stored) != [deletion_record_id(t) for t in ids]
    # The wallet balance is kept (books), but no count or amount is in the record.
    assert set(records[0]) == {"tenant_id", "requested_at", "completed_at"}


def test_erasing_an_ip_leaves_other_tenants_rows_alone(backend: dict[str, Any],
                                                      make_config: Callable[..., Config]) -> None:
    """Behind a load balancer every row has the same client IP: erasing one tenant's
    address must not blank the whole access log."""
    cfg = make_config(**backend)
    run(with_svc(cfg, lambda s: s.store.migrate()))

    async def scenario(svc: Services) -> list[dict[str, Any]]:
        ada = (await svc.tenants.create("A", "a@example.org"))["tenant_id"]
        bob = (await svc.tenants.create("B", "b@example.org"))["tenant_id"]
        async with svc.store.write() as conn:
            await conn.execute(access_log.insert(), [log_row("req_a", ada, IP), log_row("req_b", bob, IP),
                                                     log_row("req_u", None, IP)])
        await svc.tenants.delete(ada)
        async with svc.store.read() as conn:
            return [dict(r) for r in (await conn.execute(sa.select(access_log))).mappings()]

    rows = {r["request_id"]: r for r in run(with_svc(cfg, scenario))}
    assert rows["req_b"]["client_ip"] == IP  # the bystander's row keeps its address
    (mine,) = [r for rid, r in rows.items() if rid.startswith("req_anon_")]
    assert mine["client_ip"] is None


def test_deletion_fits_a_legacy_entry_id_of_full_length_under_the_longer_pseudonym(
        backend: dict[str, Any], make_config: Callable[..., Config]) -> None:
    """Before references were limited, a manual credit's id could use all 120 characters;
    the pseudonym is 5 longer than a tenant id, and PostgreSQL refuses a longer id."""
    cfg = make_config(**backend)
    run(with_svc(cfg, lambda s: s.store.migrate()))

    async def scenario(svc: Services) -> list[str]:
        tid = (await svc.tenants.create("A", "a@example.org"))["tenant_id"]
        entry_id = f"manual:{tid}:" + "r" * (120 - len(f"manual:{tid}:"))
        await svc.ledger.credit(tid, 1_000_000, entry_id, reference="r" * 93)
        await svc.tenants.delete(tid)
        async with svc.store.read() as conn:
            return list((await conn.execute(sa.select(ledger_entries.c.id))).scalars())

    (moved,) = run(with_svc(cfg, scenario))
    assert moved.startswith("manual:tn_anon_") and len(moved) <= 120


def test_postgres_role_that_cannot_rewrite_does_not_report_clean_files(make_config: Callable[..., Config]) -> None:
    """A role that owns neither the database nor its tables erases the rows, but PostgreSQL
    skips its VACUUM FULL (a warning) and refuses its CLUSTER: files_scrubbed is false."""
    role = "tollway_r_" + secrets.token_hex(4)
    with fresh_pg_database() as url:
        _pg_run(f'CREATE ROLE "{role}" LOGIN')
        try:
            _pg_run(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"',
                    f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"', url=url)
            cfg = make_config(database={"url": url.replace("postgres@", f"{role}@", 1)})
            seeded = run(with_svc(cfg, populate))
            result = run(with_svc(cfg, lambda s: s.tenants.delete(seeded["ada"])))
            assert result["files_scrubbed"] is False and result["already_deleted"] is False
            assert run(with_svc(cfg, lambda s: s.tenants.delete(seeded["ada"])))["already_deleted"] is True
        finally:
            _pg_run(f'DROP OWNED BY "{role}"', url=url)
    _pg_run(f'DROP ROLE "{role}"')


def test_a_deletion_recorded_before_the_hash_finishes_under_the_hash(make_config: Callable[..., Config]) -> None:
    """A deletion interrupted under an older version left a record naming the tenant id."""
    cfg = make_config()
    run(with_svc(cfg, lambda s: s.store.migrate()))

    async def scenario(svc: Services) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
        tid = (await svc.tenants.create("A", "a@example.org"))["tenant_id"]
        async with svc.store.write() as conn:
            await conn.execute(deletion_requests.insert().values(tenant_id=tid, requested_at=1_700_000_000_123))
        done = await svc.tenants.delete(tid)
        async with svc.store.read() as conn:
            kept = list((await conn.execute(sa.select(deletion_requests.c.tenant_id))).scalars())
        return done, kept, await svc.tenants.delete(tid)

    done, kept, again = run(with_svc(cfg, scenario))
    assert done["already_deleted"] is False and again["already_deleted"] is True
    assert kept == [deletion_record_id(done["tenant_id"])]
