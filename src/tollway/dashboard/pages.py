"""The signed-in pages: keys, wallet, privacy. Handlers are thin over the same service
objects as the CLI and the admin API (keys.py, ledger.py, webhooks/stripe.py, tenants.py)."""

from __future__ import annotations

import json
import re
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from tollway.auth.keys import Principal
from tollway.config import MAX_PER_MINUTE
from tollway.errors import NotFound, TollwayError
from tollway.money import MoneyError, parse_usd
from tollway.store.db import now_ms
from tollway.store.schema import key_spend, ledger_entries, usage_daily, usage_events
from tollway.telemetry import log

from .rollup import DAY_MS, Rollup
from .sessions import Session
from .web import Web

PAGE_SIZE = 25
# Holds for requests in flight and their release net to nothing once a request settles;
# the history shows what moved money for good. (The export has every entry.)
_HIDDEN_KINDS = ("reserve", "release")
RATE_FIELDS = {"requests_per_minute": "requests", "tokens_per_minute": "tokens"}


class Pages:
    def __init__(self, web: Web, rollup: Rollup) -> None:
        self.web = web
        self.svc = web.svc
        self.rollup = rollup

    # --- keys --------------------------------------------------------------------------------

    async def keys(self, request: Request, tenant: dict[str, Any], *, created: dict[str, Any] | None = None,
                   errors: dict[str, str] | None = None, status: int = 200) -> Response:
        rows = await self.svc.keys.list(tenant["id"])
        spent = await self._spend_this_period(tenant["id"], rows)
        now = int(time.time() * 1000)
        for row in rows:
            row["status"] = ("revoked" if row["revoked_at"] else
                             "expired" if row["expires_at"] and row["expires_at"] <= now else "active")
            row["spent_micros"], row["period"] = spent.get(row["id"], (0, "this month"))
            row["rate"] = self.svc.limiter.limits(Principal(tenant["id"], row["id"], None, None, None,
                                                            row["requests_per_minute"], row["tokens_per_minute"]))
        rows.reverse()  # newest first
        response = self.web.render(request, "keys.html", status=status, tenant=tenant, keys=rows, created=created,
                                   errors=errors or {}, values=dict(await request.form()) if errors else {},
                                   spend_limits=not self.svc.config.auth.clerk, defaults=self._rate_defaults(),
                                   notice=request.query_params.get("done"))
        return response

    async def create_key(self, request: Request, tenant: dict[str, Any]) -> Response:
        form = await request.form()
        name = str(form.get("name", "")).strip()[:200] or None
        errors: dict[str, str] = {}
        expires_at = limit = None
        period = str(form.get("spend_period", "")) or None
        days = str(form.get("expires_in_days", "")).strip()
        if days:
            if not days.isdigit() or not 1 <= int(days) <= 3650:
                errors["expires_in_days"] = "Enter a whole number of days from 1 to 3650, or leave it empty."
            else:
                expires_at = int(time.time() * 1000) + int(days) * DAY_MS
        amount = str(form.get("spend_limit", "")).strip()
        if amount:
            try:
                limit = parse_usd(amount)
                if limit <= 0:
                    raise MoneyError("must be positive")
            except MoneyError:
                errors["spend_limit"] = "Enter an amount in US dollars, such as 10.00."
            if period not in ("day", "month"):
                errors["spend_period"] = "Choose whether the limit is per day or per month."
        else:
            period = None
        rates = self._rate_limits(form, {}, errors)
        if errors:
            return await self.keys(request, tenant, errors=errors, status=400)
        key = await self.svc.keys.create(tenant["id"], name=name, expires_at=expires_at, spend_limit_micros=limit,
                                         spend_limit_period=period, **rates)
        log.info("dashboard_key_created", tenant_id=tenant["id"], key_id=key["key_id"])
        return await self.keys(request, tenant, created={**key, "name": name})

    async def key(self, request: Request, tenant: dict[str, Any]) -> Response:
        row = await self._own_key(tenant["id"], request.path_params["key_id"])
        return self.web.render(request, "key.html", tenant=tenant, key=row)

    async def revoke_key(self, request: Request, tenant: dict[str, Any]) -> Response:
        form = await request.form()
        row = await self._own_key(tenant["id"], str(form.get("key_id", "")))
        if not row["revoked_at"]:
            await self.svc.keys.revoke(row["id"])  # returns once no worker admits the key
            log.info("dashboard_key_revoked", tenant_id=tenant["id"], key_id=row["id"])
        return RedirectResponse("/dashboard/keys?done=revoked", status_code=303)

    async def key_limits(self, request: Request, tenant: dict[str, Any], *, errors: dict[str, str] | None = None,
                         status: int = 200) -> Response:
        row = await self._own_key(tenant["id"], request.path_params.get("key_id") or
                                  str((await request.form()).get("key_id", "")))
        values = {f: "" if row[f] is None else str(row[f]) for f in RATE_FIELDS}
        if errors:
            values = {f: str((await request.form()).get(f, "")) for f in RATE_FIELDS}
        return self.web.render(request, "key_limits.html", status=status, tenant=tenant, key=row, values=values,
                               errors=errors or {}, defaults=self._rate_defaults())

    async def set_key_limits(self, request: Request, tenant: dict[str, Any]) -> Response:
        """A customer's own rate limits for a key of theirs: at most the operator's [limits]
        default, which protects the provider quota (a value the key already has stays allowed)."""
        form = await request.form()
        row = await self._own_key(tenant["id"], str(form.get("key_id", "")))  # 404 for another tenant's key
        errors: dict[str, str] = {}
        if row["revoked_at"]:
            errors["key"] = "This key is revoked; its limits no longer matter."
        rates = dict.fromkeys(RATE_FIELDS) if form.get("reset") else self._rate_limits(form, row, errors)
        if errors:
            return await self.key_limits(request, tenant, errors=errors, status=400)
        try:
            await self.svc.keys.set_rate_limits(row["id"], **rates)
        except NotFound:  # a Clerk key not yet seen here has no row to keep them on (auth/clerk.py)
            return await self.key_limits(request, tenant, status=409, errors={
                "key": "This key's limits can be set once it has made its first request."})
        log.info("dashboard_key_limits_set", tenant_id=tenant["id"], key_id=row["id"], **rates)
        return RedirectResponse("/dashboard/keys?done=limits", status_code=303)

    def _rate_defaults(self) -> dict[str, int]:
        limits = self.svc.config.limits
        return {"requests_per_minute": limits.requests_per_minute, "tokens_per_minute": limits.tokens_per_minute}

    def _rate_limits(self, form: Any, current: dict[str, Any], errors: dict[str, str]) -> dict[str, int | None]:
        """The form's per-minute limits (empty: the [limits] default), each at most that default
        unless the default is 0 (unlimited); errors go into `errors` by field."""
        out: dict[str, int | None] = {}
        for field, unit in RATE_FIELDS.items():
            text, default = str(form.get(field, "")).strip(), self._rate_defaults()[field]
            value = int(text) if re.fullmatch(r"[0-9]{1,10}", text) else None
            allowed = f"from 1 to {default:,}" if default else f"from 0 (unlimited) to {MAX_PER_MINUTE:,}"
            if not text:
                out[field] = None
            elif value is None or value > MAX_PER_MINUTE:
                errors[field] = (f"Enter a whole number of {unit} per minute {allowed}, "
                                 "or leave it empty for the default.")
            elif default and (value == 0 or value > default) and value != current.get(field):
                errors[field] = (f"This gateway allows at most {default:,} {unit} per minute per key: enter a number "
                                 f"{allowed}, or leave it empty for the default.")
            else:
                out[field] = value
        return out

    async def _own_key(self, tenant_id: str, key_id: str) -> dict[str, Any]:
        return await self.svc.keys.get(tenant_id, key_id)  # NotFound for another tenant's key

    async def _spend_this_period(self, tenant_id: str, rows: list[dict[str, Any]]) -> dict[str, tuple[int, str]]:
        """Per key: a limited key's spend in its limit's period (held requests included, as the
        limit counts them); any other key's charged usage this calendar month (UTC)."""
        now = datetime.now(UTC)
        month_start = int(datetime(now.year, now.month, 1, tzinfo=UTC).timestamp() * 1000)
        split = max(month_start, await self.rollup.folded_until())
        spent: dict[str, int] = {}
        async with self.svc.store.read() as conn:
            for key_id, total in [*await conn.execute(
                    sa.select(usage_daily.c.key_id, sa.func.sum(usage_daily.c.cost_micros))
                    .where(usage_daily.c.tenant_id == tenant_id, usage_daily.c.day >= month_start // DAY_MS,
                           usage_daily.c.day < split // DAY_MS).group_by(usage_daily.c.key_id)),
                                  *await conn.execute(
                    sa.select(usage_events.c.key_id, sa.func.sum(usage_events.c.cost_micros))
                    .where(usage_events.c.tenant_id == tenant_id, self.rollup.rows_between(split, now_ms() + DAY_MS))
                    .group_by(usage_events.c.key_id))]:
                spent[str(key_id)] = spent.get(str(key_id), 0) + int(total or 0)
            out: dict[str, tuple[int, str]] = {k: (v, "this month") for k, v in spent.items()}
            for row in rows:
                if row["spend_limit_micros"] is not None:
                    period = Principal(tenant_id, row["id"], None, row["spend_limit_micros"],
                                       row["spend_limit_period"]).spend_period()
                    used = (await conn.execute(sa.select(key_spend.c.spent_micros).where(
                        key_spend.c.key_id == row["id"], key_spend.c.period == period))).scalar()
                    out[row["id"]] = (int(used or 0), "today" if row["spend_limit_period"] == "day" else "this month")
        return out

    # --- wallet ------------------------------------------------------------------------------

    async def wallet(self, request: Request, tenant: dict[str, Any], *, problem: str | None = None,
                     status: int = 200) -> Response:
        page = request.query_params.get("page", "1")
        number = int(page) if page.isdigit() and 0 < int(page) < 100_000 else 1
        async with self.svc.store.read() as conn:
            entries = [dict(r) for r in (await conn.execute(
                sa.select(ledger_entries).where(ledger_entries.c.tenant_id == tenant["id"],
                                                ledger_entries.c.kind.not_in(_HIDDEN_KINDS))
                .order_by(ledger_entries.c.created_at.desc(), ledger_entries.c.id.desc())
                .limit(PAGE_SIZE + 1).offset((number - 1) * PAGE_SIZE))).mappings().all()]
        stripe = self.svc.config.stripe
        return self.web.render(
            request, "wallet.html", status=status, attempt=secrets.token_urlsafe(12), tenant=tenant,
            wallet=await self.svc.ledger.wallet(tenant["id"]),
            entries=entries[:PAGE_SIZE], page=number, more=len(entries) > PAGE_SIZE, problem=problem,
            topups=stripe is not None, paid=request.query_params.get("paid") == "1",
            min_usd=stripe.min_topup_usd if stripe else None, max_usd=stripe.max_topup_usd if stripe else None)

    async def topup(self, request: Request, tenant: dict[str, Any]) -> Response:
        from tollway.webhooks.stripe import start_topup  # stripe-python loads only when used

        form = await request.form()
        try:
            # The form's one-time attempt id: a double click opens one Checkout session, not two.
            session = await start_topup(self.svc.payments, tenant["id"], str(form.get("amount_usd", "")).strip(),
                                        idempotency_key=str(form.get("attempt", ""))[:40] or None)
        except TollwayError as exc:
            return await self.wallet(request, tenant, problem=exc.message, status=exc.status)
        # Nothing is credited here or on the return page: only the verified webhook credits.
        return RedirectResponse(session["checkout_url"], status_code=303)

    async def entry(self, request: Request, tenant: dict[str, Any]) -> Response:
        async with self.svc.store.read() as conn:
            row = (await conn.execute(sa.select(ledger_entries).where(
                ledger_entries.c.id == request.path_params["entry_id"],
                ledger_entries.c.tenant_id == tenant["id"]))).mappings().first()
        if row is None:
            raise NotFound("no such entry")
        return self.web.render(request, "entry.html", tenant=tenant, entry=dict(row))

    # --- privacy -----------------------------------------------------------------------------

    async def privacy(self, request: Request, tenant: dict[str, Any], *, error: str | None = None,
                      status: int = 200) -> Response:
        return self.web.render(request, "privacy.html", status=status, tenant=tenant, error=error,
                               confirm_with=_confirm_word(tenant))

    async def export(self, request: Request, tenant: dict[str, Any]) -> Response:
        data = await self.svc.tenants.export(tenant["id"])
        return Response(json.dumps(data, default=str, indent=2), media_type="application/json", headers={
            "content-disposition": f'attachment; filename="tollway-export-{tenant["id"]}.json"'})

    async def delete(self, request: Request, tenant: dict[str, Any]) -> Response:
        form = await request.form()
        if str(form.get("confirm", "")).strip() != _confirm_word(tenant):
            return await self.privacy(request, tenant, status=400,
                                      error=f"Type {_confirm_word(tenant)} exactly to confirm the deletion.")
        try:
            result = await self.svc.tenants.delete(tenant["id"])  # revokes every key before it returns
        except TollwayError as exc:
            return await self.privacy(request, tenant, error=exc.message, status=exc.status)
        request.scope["tollway_session"] = Session(None, self.web.sessions.current(request).csrf)
        response = self.web.render(request, "deleted.html", result=result)
        self.web.sessions.clear(response)
        return response


def _confirm_word(tenant: dict[str, Any]) -> str:
    """What the person types to delete the account: its email, else its id."""
    return str(tenant.get("email") or tenant["id"])
