"""Tenants: the customers of the gateway. Creating one opens its wallet; deleting one
erases the person and keeps the books.

Deletion (GDPR art. 17, CCPA) in four steps, each safe to repeat if the process dies:
  1. the request is recorded in deletion_requests, under a hash of the tenant id and with
     the UTC day only (erasure.py);
  2. every key is revoked at once (keys.revoke_tenant returns when no worker admits it);
  3. open reservations are released: requests still in flight are not charged;
  4. one transaction erases and pseudonymises, and records the completion day.

What "pseudonymise" means here. A tenant id is random and opaque, but it is not
anonymous: it is in the operator's Stripe metadata next to the customer's card and
email, in log lines shipped elsewhere, in the attribution header sent upstream, and in
the customer's own records. Hashing it would not help (anyone holding the id can compute
the hash). So the usage, ledger, payment and access-log rows are moved to a *fresh*
random id ("tn_anon_..."), and request and key ids are replaced by an HMAC under a
random salt that is discarded when the transaction ends: the rows still add up per
account and per request (reserve/release/debit of one request keep one shared id), but
nothing in the database maps back to the person. The deletion record shares no value
with the pseudonymous rows (its times are whole days, theirs come from the books) and
no order (records are stored in hash order). Stripe object ids in ledger ids and
payment rows are kept: they are the processor's payment records, which accounting law
requires keeping and which let a later refund or dispute still find its wallet; through
Stripe's own metadata they lead back to the customer (docs/privacy.md).

What is erased: the tenant row (name, email, external_id), the key rows (their names
are often personal), the tenant's client IPs in its access-log rows. SQLite runs with
secure_delete, and the WAL is checkpointed and truncated afterwards, so the bytes are
gone from the database files. On PostgreSQL, once no transaction could still see the
old row versions (until then even VACUUM FULL keeps them), VACUUM FULL rewrites every
table the deletion touched (erasure.REWRITTEN_TABLES); its WAL, replicas and backups age
out by the operator's policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncConnection

from tollway.auth.keys import new_id
from tollway.erasure import (
    Pseudonyms,
    deletion_record_id,
    find_record,
    insert_record,
    move_access_log,
    move_ledger,
    move_set_aside,
    move_usage,
    record_filter,
    scrub_files,
    utc_day,
)
from tollway.errors import Conflict, NotFound
from tollway.ledger.transactions import Ledger
from tollway.money import format_usd
from tollway.store.db import Store, now_ms
from tollway.store.schema import (
    access_log,
    api_keys,
    deletion_requests,
    key_spend,
    ledger_entries,
    reservations,
    set_aside_charges,
    stripe_events,
    tenants,
    topups,
    usage_daily,
    usage_events,
    wallets,
)
from tollway.telemetry import log

if TYPE_CHECKING:
    from tollway.auth.keys import Keys

# Every table with a tenant_id column, and what deletion does to it (a test checks that
# a new table holding tenant ids cannot be added without deciding this).
TENANT_TABLES: dict[str, str] = {
    "tenants": "row erased",
    "api_keys": "rows erased after revocation",
    "wallets": "moved to the pseudonym",
    "ledger_entries": "moved to the pseudonym; request ids pseudonymised",
    "usage_events": "moved to the pseudonym; request and key ids pseudonymised",
    "reservations": "released before erasure (none remain)",
    "topups": "moved to the pseudonym (Stripe ids kept)",
    "access_log": "moved to the pseudonym; client IPs erased",
    "set_aside_charges": "moved to the pseudonym; request and key ids pseudonymised",
    "deletion_requests": "kept: the record of the request and its completion",
    "usage_daily": "rows erased (dashboard totals, derived from the pseudonymised usage rows)",
}
_ATTEMPTS = 5


class Tenants:
    def __init__(self, store: Store, ledger: Ledger, keys: Keys | None = None) -> None:
        self.store = store
        self.ledger = ledger
        self.keys = keys

    async def create(self, name: str | None = None, email: str | None = None,
                     external_id: str | None = None) -> dict[str, Any]:
        tenant_id = new_id("tn")
        async with self.store.write() as conn:
            await conn.execute(tenants.insert().values(
                id=tenant_id, name=name, email=email, external_id=external_id, created_at=now_ms()))
            await self.ledger.open_wallet(conn, tenant_id)
        return {"tenant_id": tenant_id, "name": name, "email": email}

    async def for_external_id(self, external_id: str, name: str | None = None, email: str | None = None) -> str:
        """The live tenant of an identity-provider subject, created (with an empty wallet) on
        first sight. Processes racing to create it make one: external_id is unique, so the
        loser's insert fails and it reads the winner's."""
        for _ in range(3):
            async with self.store.read() as conn:
                found = (await conn.execute(sa.select(tenants.c.id).where(
                    tenants.c.external_id == external_id, tenants.c.deleted_at.is_(None)))).scalar()
            if found is not None:
                return str(found)
            try:
                return str((await self.create(name, email, external_id))["tenant_id"])
            except sa.exc.IntegrityError:
                continue  # another worker (or tab) created it first: use that one
        raise RuntimeError("could not create or find the tenant of an identity-provider subject")

    async def get(self, tenant_id: str) -> dict[str, Any]:
        async with self.store.read() as conn:
            row = (await conn.execute(sa.select(tenants).where(tenants.c.id == tenant_id))).mappings().first()
            if row is None or row["deleted_at"] is not None:
                raise await _not_found(conn, tenant_id)
        return dict(row)

    async def list(self) -> list[dict[str, Any]]:
        """Live tenants (the pseudonymous holders of deleted tenants' books are not listed)."""
        async with self.store.read() as conn:
            rows = (await conn.execute(
                sa.select(tenants).where(tenants.c.deleted_at.is_(None)).order_by(tenants.c.created_at)
            )).mappings().all()
        return [dict(r) for r in rows]

    # --- export ---------------------------------------------------------------------------

    async def export(self, tenant_id: str) -> dict[str, Any]:
        """Everything Tollway holds about a tenant, as one JSON-ready object (GDPR art. 15/20)."""
        key_cols = [c for c in api_keys.c if c.name != "key_hash"]
        await self.ledger.flush()  # every settled request's usage row, journaled ones too
        async with self.store.read() as conn:
            profile = (await conn.execute(sa.select(tenants).where(tenants.c.id == tenant_id))).mappings().first()
            if profile is None or profile["deleted_at"] is not None:
                raise await _not_found(conn, tenant_id)

            async def rows(query: Any) -> list[dict[str, Any]]:
                return [_readable(dict(r)) for r in (await conn.execute(query)).mappings().all()]

            balance = (await conn.execute(
                sa.select(wallets.c.balance_micros).where(wallets.c.tenant_id == tenant_id))).scalar()
            keys = await rows(sa.select(*key_cols).where(api_keys.c.tenant_id == tenant_id)
                              .order_by(api_keys.c.created_at))
            ledger = await rows(sa.select(ledger_entries).where(ledger_entries.c.tenant_id == tenant_id)
                                .order_by(ledger_entries.c.created_at, ledger_entries.c.id))
            usage = await rows(sa.select(usage_events).where(usage_events.c.tenant_id == tenant_id)
                               .order_by(usage_events.c.created_at))
            payments = await rows(sa.select(topups).where(topups.c.tenant_id == tenant_id)
                                  .order_by(topups.c.created_at))
            access = await rows(sa.select(access_log).where(access_log.c.tenant_id == tenant_id)
                                .order_by(access_log.c.created_at))
            set_aside = await rows(sa.select(set_aside_charges).where(set_aside_charges.c.tenant_id == tenant_id))
        return {
            "format": "tollway-tenant-export/1",
            "exported_at": _iso(now_ms()),
            "profile": _readable({k: v for k, v in profile.items() if k != "deleted_at"}),
            "wallet": {"balance_micros": int(balance or 0), "balance_usd": format_usd(int(balance or 0))},
            "keys": keys,
            "ledger": ledger,
            "usage": usage,
            "payments": payments,
            "access_log": access,
            "set_aside_charges": set_aside,  # journaled charges not applied (docs/ledger.md)
        }

    # --- deletion ---------------------------------------------------------------------------

    async def delete(self, tenant_id: str) -> dict[str, Any]:
        """Erase a tenant's personal data and pseudonymise its books; idempotent."""
        if self.keys is None:
            raise RuntimeError("Tenants.delete needs the Keys service to revoke keys")
        record, done = await self._record_request(tenant_id)
        if done:
            return {**record, "already_deleted": True}
        revoked = await self.keys.revoke_tenant(tenant_id)
        released = 0
        erased: tuple[dict[str, Any], int | None] | None = None
        for attempt in range(_ATTEMPTS):
            for rid in await self.ledger.open_requests(tenant_id):
                if await self.ledger.release(rid) is not None:
                    released += 1
            await self.ledger.flush()  # journaled charges into the books that are moved below
            erased = await self._erase(tenant_id)
            if erased is not None:
                break
            await asyncio.sleep(0.05 * (attempt + 1))  # a request that authenticated just before revocation
        if erased is None:
            raise Conflict("requests of this tenant are still starting; retry the deletion in a moment")
        result, xid = erased
        scrubbed = await scrub_files(self.store, xid)
        if not scrubbed:
            log.warning("tenant_deleted_files_not_scrubbed", tenant_id=tenant_id,
                        notice="an older transaction outlived the wait, or the database role may not "
                               "rewrite the tables (PostgreSQL: superuser or database owner); the erased bytes "
                               "leave the files at the next checkpoint (SQLite) or VACUUM FULL (PostgreSQL)")
        log.info("tenant_deleted", tenant_id=tenant_id, count=revoked, released=released)
        return {**result, "keys_revoked": revoked, "reservations_released": released, "already_deleted": False,
                "files_scrubbed": scrubbed}

    async def _record_request(self, tenant_id: str) -> tuple[dict[str, Any], bool]:
        async with self.store.write() as conn:
            t = (await conn.execute(sa.select(tenants.c.deleted_at).where(tenants.c.id == tenant_id))).first()
            found = await find_record(conn, tenant_id)
            if t is None or t.deleted_at is not None:
                if found is not None and found["completed_at"] is not None:
                    return _request_view(tenant_id, found), True
                raise NotFound(f"no tenant {tenant_id}")
            if found is not None:
                return _request_view(tenant_id, found), False  # an interrupted deletion: finish it
            day = utc_day(now_ms())
            await insert_record(conn, self.store.is_sqlite, deletion_record_id(tenant_id), day)
            await conn.execute(tenants.update().where(tenants.c.id == tenant_id).values(deletion_requested_at=day))
        return _request_view(tenant_id, {"requested_at": day, "completed_at": None}), False

    async def _erase(self, tenant_id: str) -> tuple[dict[str, Any], int | None] | None:
        """One transaction; None (and nothing changed) if a reservation appeared meanwhile.
        Returns the deletion request's view and, on PostgreSQL, the transaction's id."""
        async with self.store.write() as conn:
            held = (await conn.execute(sa.select(sa.func.count()).select_from(reservations)
                                       .where(reservations.c.tenant_id == tenant_id))).scalar_one()
            if held or self.ledger.held_in_memory(tenant_id) or self.ledger.unapplied(tenant_id):
                return None
            pseudo = Pseudonyms()
            anon = pseudo.tenant
            # The pseudonymous rows take their times from the books (when the account was
            # opened, its last balance change), never the time of this transaction: the
            # deletion record keeps that, and one shared value would join the two.
            created = (await conn.execute(sa.select(tenants.c.created_at)
                                          .where(tenants.c.id == tenant_id))).scalar_one()
            wallet = (await conn.execute(sa.select(wallets.c.balance_micros, wallets.c.updated_at)
                                         .where(wallets.c.tenant_id == tenant_id))).first()
            balance, last = (int(wallet[0]), int(wallet[1])) if wallet is not None else (0, created)
            await conn.execute(tenants.insert().values(id=anon, created_at=created, deletion_requested_at=last,
                                                       deleted_at=last))
            await conn.execute(wallets.insert().values(tenant_id=anon, balance_micros=balance, updated_at=last))
            await conn.execute(wallets.delete().where(wallets.c.tenant_id == tenant_id))
            await move_ledger(conn, tenant_id, anon, pseudo)
            await move_usage(conn, tenant_id, anon, pseudo)
            await move_access_log(conn, tenant_id, anon, pseudo)
            await move_set_aside(conn, tenant_id, anon, pseudo)
            await conn.execute(topups.update().where(topups.c.tenant_id == tenant_id).values(tenant_id=anon))
            await conn.execute(  # outcomes name the tenant ("credited 5.00 to tn_...")
                stripe_events.update().where(stripe_events.c.outcome.contains(tenant_id, autoescape=True))
                .values(outcome=sa.func.replace(stripe_events.c.outcome, tenant_id, anon)))
            key_ids = sa.select(api_keys.c.id).where(api_keys.c.tenant_id == tenant_id)
            await conn.execute(key_spend.delete().where(key_spend.c.key_id.in_(key_ids)))
            await conn.execute(api_keys.delete().where(api_keys.c.tenant_id == tenant_id))
            await conn.execute(usage_daily.delete().where(usage_daily.c.tenant_id == tenant_id))
            await conn.execute(tenants.delete().where(tenants.c.id == tenant_id))
            record = record_filter(tenant_id)
            await conn.execute(deletion_requests.update().where(record).values(  # a record made before the
                tenant_id=deletion_record_id(tenant_id), completed_at=utc_day(now_ms())))  # hash gets it too
            req = (await conn.execute(sa.select(deletion_requests).where(record))).mappings().one()
            xid = None  # PostgreSQL: this transaction's id, to know when its deletes are invisible
            if not self.store.is_sqlite:
                xid = int((await conn.exec_driver_sql("SELECT txid_current()")).scalar_one())
        # The remaining balance is reported so the operator can refund it; the pseudonym is not.
        return {**_request_view(tenant_id, dict(req)), "balance_usd": format_usd(balance)}, xid


async def _not_found(conn: AsyncConnection, tenant_id: str) -> NotFound:
    record = await find_record(conn, tenant_id)
    done = record["completed_at"] if record is not None else None
    if done is not None:
        return NotFound(f"tenant {tenant_id} was deleted on {_iso(done)[:10]}")
    return NotFound(f"no tenant {tenant_id}")


def _request_view(tenant_id: str, req: Mapping[str, Any]) -> dict[str, Any]:
    return {"tenant_id": tenant_id, "requested_at": _iso(req["requested_at"]),
            "completed_at": _iso(req["completed_at"]) if req["completed_at"] is not None else None}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _readable(row: dict[str, Any]) -> dict[str, Any]:
    """Epoch-ms *_at fields as ISO 8601, micro-USD amounts also as exact USD strings."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k.endswith("_at") and isinstance(v, int):
            out[k] = _iso(v)
        else:
            out[k] = v
        if k.endswith("_micros") and isinstance(v, int):
            out[k.removesuffix("_micros") + "_usd"] = format_usd(v)
    return out
