"""The operator CLI: a thin layer over the same service objects as the admin API.

Every command takes --json and then prints exactly one JSON object on stdout. Expected
errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import click

from tollway import config as config_mod
from tollway.config import MAX_PER_MINUTE, Config, ConfigError
from tollway.errors import TollwayError
from tollway.ledger.holds import DatabaseInUse, ServingLock
from tollway.money import MoneyError, format_usd, parse_operator_usd
from tollway.services import Services, build, config_dir
from tollway.store.db import sqlite_path

T = TypeVar("T")


class CliError(Exception):
    pass


def emit(obj: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str] | None = None) -> None:
    if as_json:
        click.echo(json.dumps(obj, default=str, sort_keys=True))
    else:
        click.echo(human(obj) if human else "\n".join(f"{k}: {v}" for k, v in obj.items()))


def handle_errors(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, CliError, MoneyError, ValueError) as exc:
            _fail(str(exc))
        except TollwayError as exc:
            _fail(exc.message)
        raise AssertionError("unreachable")

    return wrapper


def _fail(message: str) -> None:
    click.echo(f"error: {message.splitlines()[0] if message else 'failed'}", err=True)
    sys.exit(1)


def load_config(path: str | None) -> Config:
    return config_mod.load(config_mod.find_config_path(path))


def with_services(cfg: Config, fn: Callable[[Services], Awaitable[T]]) -> T:
    async def run() -> T:
        svc = build(cfg)
        try:
            if svc.store.is_sqlite:
                await svc.store.migrate()
            return await fn(svc)
        finally:
            await svc.close()

    return asyncio.run(run())


config_option = click.option("--config", "config_path", default=None, metavar="PATH",
                             help="tollway.toml (default: $TOLLWAY_CONFIG, then ./tollway.toml)")
json_option = click.option("--json", "as_json", is_flag=True, help="print one JSON object")


@click.group()
@click.version_option(package_name="tollway")
def main() -> None:
    """Tollway: a self-hostable LLM API gateway."""
    from tollway import log_output

    log_output.set_log_stream("stderr")  # stdout carries the command's result (one JSON object with --json)


@main.command()
@click.option("--path", default="tollway.toml", show_default=True)
@json_option
@handle_errors
def init(path: str, as_json: bool) -> None:
    """Write a commented starter tollway.toml (refuses to overwrite)."""
    target = Path(path)
    if target.exists():
        raise CliError(f"{target} already exists; not overwriting it")
    text = resources.files("tollway").joinpath("tollway.example.toml").read_text("utf-8")
    target.write_text(text, encoding="utf-8")
    emit({"written": str(target)}, as_json, lambda o: f"wrote {o['written']}; next: tollway serve")


@main.command()
@config_option
@click.option("--host", default=None)
@click.option("--port", default=None, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
@json_option
@handle_errors
def serve(config_path: str | None, host: str | None, port: int | None, workers: int, as_json: bool) -> None:
    """Run the gateway; on SIGTERM, drain (server.drain_timeout_seconds) and exit 0."""
    from tollway import serving, telemetry

    cfg = load_config(config_path)
    config_mod.provider_secrets(cfg)  # fail now, with the key path, if a provider key is unset
    os.environ[config_mod.CONFIG_ENV] = str(Path(cfg.source).resolve())
    os.environ[config_mod.WORKERS_ENV] = str(workers)

    async def prepare(svc: Services) -> list[str]:
        # PostgreSQL: say so in one line here, rather than as N worker start-up failures.
        if not await svc.store.migrations_current():
            raise CliError("database migrations are not current; run `tollway migrate` first")
        _check_database_free(svc.store.sqlite_file, workers)
        return svc.notices

    notices = with_services(cfg, prepare)  # SQLite: migrations applied once, before workers fork
    h, p = host or cfg.server.host, port or cfg.server.port
    telemetry.configure_logging()
    from tollway.surface import warnings

    telemetry.log_startup(h, p, workers, notices + warnings(cfg, h))
    with contextlib.ExitStack() as stack:
        if workers > 1 and not os.environ.get(telemetry.MULTIPROC_ENV):
            # One metrics folder shared by this run's workers: /metrics sums them all.
            os.environ[telemetry.MULTIPROC_ENV] = stack.enter_context(tempfile.TemporaryDirectory(prefix="tollway-"))
        # Drains on SIGTERM, with the connection bounds (serving.py).
        status = serving.serve(h, p, workers, cfg.server)
    if status:
        sys.exit(status)


def _check_database_free(db: Path | None, workers: int) -> None:
    """Say in one line, before any worker starts, that the SQLite database is already
    served in a way this run cannot join (ledger/holds.py); each worker's start-up checks again
    and holds the lock."""
    if db is None:
        return
    try:
        with ServingLock(db, exclusive=workers == 1):
            pass
    except DatabaseInUse as exc:
        raise CliError(str(exc)) from None


@main.command()
@config_option
@json_option
@handle_errors
def migrate(config_path: str | None, as_json: bool) -> None:
    """Apply database migrations."""
    cfg = load_config(config_path)

    async def run(svc: Services) -> dict[str, Any]:
        await svc.store.migrate()
        return {"migrated": True, "database": _redact_url(cfg.database.url)}

    emit(with_services(cfg, run), as_json)


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@config_option
@json_option
@handle_errors
def config_check(config_path: str | None, as_json: bool) -> None:
    """Validate tollway.toml and print the production surface."""
    from tollway.surface import describe, render_text

    cfg = load_config(config_path)
    surface = describe(cfg)
    emit({"ok": True, "surface": surface}, as_json, lambda o: render_text(surface))


@main.group()
def tenants() -> None:
    """Create and inspect tenants."""


@tenants.command("create")
@config_option
@click.option("--name", required=True)
@click.option("--email", default=None)
@json_option
@handle_errors
def tenants_create(config_path: str | None, name: str, email: str | None, as_json: bool) -> None:
    cfg = load_config(config_path)
    emit(with_services(cfg, lambda s: s.tenants.create(name, email)), as_json)


@tenants.command("show")
@config_option
@click.argument("tenant_id")
@json_option
@handle_errors
def tenants_show(config_path: str | None, tenant_id: str, as_json: bool) -> None:
    cfg = load_config(config_path)
    emit(with_services(cfg, lambda s: s.tenants.get(tenant_id)), as_json)


@tenants.command("delete")
@config_option
@click.argument("tenant_id")
@json_option
@handle_errors
def tenants_delete(config_path: str | None, tenant_id: str, as_json: bool) -> None:
    """Revoke the tenant's keys, erase its personal data, pseudonymise its usage and ledger.
    Through the running gateway's admin API when one serves the database alone."""
    from tollway.tenant_delete import ServerDeleteError, delete_through_server

    cfg = load_config(config_path)
    db = sqlite_path(cfg.database.url, config_dir(cfg))
    try:
        # Held while deleting: a gateway that keeps holds in memory cannot start meanwhile.
        lock = ServingLock(db, exclusive=False) if db is not None else contextlib.nullcontext()
        with lock:
            result = with_services(cfg, lambda s: _recover_then_delete(s, tenant_id))
    except DatabaseInUse:
        # That gateway holds this tenant's in-flight and journaled charges, which this
        # process cannot see: only it can delete the tenant without dropping them.
        try:
            result = delete_through_server(cfg, tenant_id)
        except ServerDeleteError as exc:
            raise CliError(str(exc)) from None
    emit(result, as_json)


async def _recover_then_delete(svc: Services, tenant_id: str) -> dict[str, Any]:
    # No gateway holds the database alone (the lock): charges one left in its journal when
    # it died go into the books before they are moved, not later, to a wallet that is gone.
    await svc.ledger.recover_charges()
    return await svc.tenants.delete(tenant_id)


@tenants.command("export")
@config_option
@click.argument("tenant_id")
@json_option
@handle_errors
def tenants_export(config_path: str | None, tenant_id: str, as_json: bool) -> None:
    """Print everything held about a tenant (profile, keys metadata, ledger, usage) as JSON."""
    cfg = load_config(config_path)
    emit(with_services(cfg, lambda s: s.tenants.export(tenant_id)), as_json,
         lambda o: json.dumps(o, default=str, indent=2))


@main.command("dashboard-link")
@config_option
@click.option("--tenant", "tenant_id", required=True)
@json_option
@handle_errors
def dashboard_link(config_path: str | None, tenant_id: str, as_json: bool) -> None:
    """Print a dashboard sign-in link for a tenant: it works once, within 15 minutes."""
    from tollway.dashboard.sessions import LINK_MAX_AGE, Sessions

    cfg = load_config(config_path)
    if cfg.dashboard is None:
        raise CliError(f"{cfg.source}: no [dashboard] table; add one to serve the dashboard (docs/dashboard.md)")
    dashboard = cfg.dashboard

    async def run(svc: Services) -> dict[str, Any]:
        tenant = await svc.tenants.get(tenant_id)  # NotFound for an unknown or deleted tenant
        sessions, _ = Sessions.from_config(dashboard, svc.store.sqlite_file, svc.store)
        return {"tenant_id": tenant["id"], "url": sessions.link(tenant["id"]), "expires_in_seconds": LINK_MAX_AGE}

    emit(with_services(cfg, run), as_json, lambda o: f"{o['url']}\n(works once, expires in 15 minutes)")


@main.command()
@config_option
@json_option
@handle_errors
def purge(config_path: str | None, as_json: bool) -> None:
    """Delete access-log rows older than retention.access_log_days (usage and ledger are kept)."""
    from tollway.retention import purge_access_log

    cfg = load_config(config_path)
    result = with_services(cfg, lambda s: purge_access_log(s.store, cfg.retention.access_log_days))
    emit(result, as_json, lambda o: f"deleted {o['deleted']} access-log rows older than {o['cutoff']} "
                                    f"({o['access_log_days']} days)")


@main.group()
def keys() -> None:
    """Issue, list and revoke customer API keys."""


@keys.command("create")
@config_option
@click.option("--tenant", "tenant_id", required=True)
@click.option("--name", default=None)
@click.option("--expires-in-days", type=click.IntRange(1), default=None)
@click.option("--spend-limit", "spend_limit", default=None, help="USD, e.g. 10.00")
@click.option("--spend-period", type=click.Choice(["day", "month"]), default=None)
@click.option("--rpm", type=click.IntRange(0, MAX_PER_MINUTE), default=None,
              help="requests per minute for this key (0: unlimited; default: [limits])")
@click.option("--tpm", type=click.IntRange(0, MAX_PER_MINUTE), default=None,
              help="tokens per minute for this key (0: unlimited; default: [limits])")
@json_option
@handle_errors
def keys_create(config_path: str | None, tenant_id: str, name: str | None, expires_in_days: int | None,
                spend_limit: str | None, spend_period: str | None, rpm: int | None, tpm: int | None,
                as_json: bool) -> None:
    """Create a key; the key itself is shown only this once."""
    import time

    cfg = load_config(config_path)
    expires = int((time.time() + expires_in_days * 86400) * 1000) if expires_in_days else None
    limit = parse_operator_usd(spend_limit) if spend_limit else None
    result = with_services(cfg, lambda s: s.keys.create(
        tenant_id, name=name, expires_at=expires, spend_limit_micros=limit, spend_limit_period=spend_period,
        requests_per_minute=rpm, tokens_per_minute=tpm))
    emit(result, as_json, lambda o: f"key_id: {o['key_id']}\nkey: {o['key']}\n(store it now: it is not shown again)")


@keys.command("list")
@config_option
@click.option("--tenant", "tenant_id", required=True)
@json_option
@handle_errors
def keys_list(config_path: str | None, tenant_id: str, as_json: bool) -> None:
    cfg = load_config(config_path)
    rows = with_services(cfg, lambda s: s.keys.list(tenant_id))
    emit({"tenant_id": tenant_id, "keys": rows}, as_json,
         lambda o: "\n".join(f"{k['id']}  {k['prefix']}…  {k['name'] or ''}  "
                             f"{'revoked' if k['revoked_at'] else 'active'}" for k in o["keys"]) or "no keys")


def _rate(value: str | None, option: str) -> dict[str, int | None]:
    """--rpm/--tpm of `keys update`: a number (0: unlimited) or `default` (the [limits] one)."""
    if value is None:
        return {}
    name = {"--rpm": "requests_per_minute", "--tpm": "tokens_per_minute"}[option]
    if value == "default":
        return {name: None}
    if not value.isdigit() or not 0 <= int(value) <= MAX_PER_MINUTE:
        raise CliError(f"{option}: expected a whole number from 0 (unlimited) to {MAX_PER_MINUTE}, or 'default'")
    return {name: int(value)}


@keys.command("update")
@config_option
@click.argument("key_id")
@click.option("--rpm", default=None, metavar="N|default", help="requests per minute (0: unlimited)")
@click.option("--tpm", default=None, metavar="N|default", help="tokens per minute (0: unlimited)")
@json_option
@handle_errors
def keys_update(config_path: str | None, key_id: str, rpm: str | None, tpm: str | None, as_json: bool) -> None:
    """Set a key's own rate limits; running workers apply them within cache.key_ttl_seconds."""
    limits = {**_rate(rpm, "--rpm"), **_rate(tpm, "--tpm")}
    if not limits:
        raise CliError("give --rpm and/or --tpm")
    cfg = load_config(config_path)
    emit(with_services(cfg, lambda s: s.keys.set_rate_limits(key_id, **limits)), as_json)


@keys.command("revoke")
@config_option
@click.argument("key_id")
@json_option
@handle_errors
def keys_revoke(config_path: str | None, key_id: str, as_json: bool) -> None:
    """Revoke a key; returns once no running worker admits it."""
    cfg = load_config(config_path)
    emit(with_services(cfg, lambda s: s.keys.revoke(key_id)), as_json)


@main.group()
def wallet() -> None:
    """Credit and inspect wallets."""


@wallet.command("credit")
@config_option
@click.option("--tenant", "tenant_id", required=True)
@click.option("--amount", required=True, help="USD, e.g. 5.00")
@click.option("--reference", required=True, help="idempotency reference")
@json_option
@handle_errors
def wallet_credit(config_path: str | None, tenant_id: str, amount: str, reference: str, as_json: bool) -> None:
    cfg = load_config(config_path)
    micros = parse_operator_usd(amount)
    result = with_services(cfg, lambda s: s.ledger.credit_manual(tenant_id, micros, reference))
    emit({"tenant_id": tenant_id, "applied": result["applied"], "balance_usd": format_usd(result["balance_micros"])},
         as_json)


@wallet.command("show")
@config_option
@click.option("--tenant", "tenant_id", required=True)
@json_option
@handle_errors
def wallet_show(config_path: str | None, tenant_id: str, as_json: bool) -> None:
    cfg = load_config(config_path)
    emit(with_services(cfg, lambda s: s.ledger.wallet(tenant_id)), as_json)


@main.group()
def ledger() -> None:
    """Check the ledger."""


@ledger.command("verify")
@config_option
@json_option
@handle_errors
def ledger_verify(config_path: str | None, as_json: bool) -> None:
    """Recompute every balance from the ledger; exit 1 naming the tenant on any mismatch."""
    cfg = load_config(config_path)
    max_age = cfg.server.max_request_ms
    problems = with_services(cfg, lambda s: s.ledger.verify(max_age))
    emit({"ok": not problems, "problems": problems}, as_json,
         lambda o: "ledger ok" if o["ok"] else "\n".join(o["problems"]))
    if problems:
        if not as_json:
            click.echo(f"error: {problems[0]}", err=True)
        sys.exit(1)


@ledger.command("resolve")
@config_option
@click.argument("request_id")
@click.option("--charge", "action", flag_value="charge", help="debit the set-aside amount now")
@click.option("--drop", "action", flag_value="drop", help="charge nothing")
@json_option
@handle_errors
def ledger_resolve(config_path: str | None, request_id: str, action: str | None, as_json: bool) -> None:
    """Resolve a charge the journal set aside (`ledger verify` lists them; docs/ledger.md)."""
    from tollway.ledger.set_aside import resolve

    if action is None:
        raise CliError("say --charge or --drop")
    cfg = load_config(config_path)
    emit(with_services(cfg, lambda s: resolve(s.ledger, request_id, charge=action == "charge")), as_json)


def _redact_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}@{host}" if ":" not in creds else f"{scheme}://{user}:***@{host}"
    return url
