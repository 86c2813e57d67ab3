"""Against a real `tollway serve`: a provider's absurd usage report does not stop billing
or a restart, and `ledger verify` reports a charge the journal set aside (journal.py);
`tollway tenants delete` hands the deletion to the gateway that holds the database
alone, or refuses (tenant_delete.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import ServerThread, free_port
from tests.fakes.harness import fake_models
from tests.test_journal_faults import _journal_by_hand, _poison
from tests.test_ledger import _run, _serve, rid
from tests.test_usage_bounds import GOOD, Upstream
from tollway.config import Config
from tollway.ledger.holds import ServingLock
from tollway.ledger.journal import Charge
from tollway.services import Services
from tollway.store.schema import tenants, usage_events

ADMIN_TOKEN = "admin-" + "t" * 32


def _config(make_config: Callable[..., Config], upstream_url: str, port: int) -> Config:
    return make_config(server={"port": port}, models=fake_models(), providers={
        "fake": {"type": "openai", "base_url": upstream_url + "/v1", "api_key_env": "FAKE_PROVIDER_KEY"},
        "echo": {"type": "echo"}})


def _tenants(cfg: Config, n: int) -> list[tuple[str, str]]:
    async def setup(s: Services) -> list[tuple[str, str]]:
        await s.store.migrate()
        made = []
        for i in range(n):
            tid = str((await s.tenants.create(f"T{i}"))["tenant_id"])
            await s.ledger.credit(tid, 10_000_000, f"fund-{tid}")
            made.append((tid, str((await s.keys.create(tid))["key"])))
        return made

    return _run(cfg, setup)  # type: ignore[no-any-return]


def _cli(cfg: Config, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tollway", *args, "--config", cfg.source, "--json"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def _chat(port: int, key: str) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": "acme/chat", "max_tokens": 40, "messages": [{"role": "user", "content": "hi"}]})


def _usage_row_appears(cfg: Config, request_id: str, within: float) -> bool:
    async def read(s: Services) -> bool:
        async with s.store.read() as conn:
            return (await conn.execute(sa.select(usage_events.c.request_id)
                                       .where(usage_events.c.request_id == request_id))).first() is not None

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _run(cfg, read):
            return True
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_an_absurd_usage_report_neither_stops_billing_nor_a_restart(
        make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread]) -> None:
    upstream = Upstream()
    port = free_port()
    cfg = _config(make_config, serve_app(upstream.app()).url, port)
    (a, key_a), (b, key_b) = _tenants(cfg, 2)
    proc = _serve(cfg, port)
    try:
        upstream.usage = {"prompt_tokens": 9, "completion_tokens": 2**63, "total_tokens": 2**63 + 9}
        absurd = _chat(port, key_a)
        assert absurd.status_code == 200 and absurd.headers["x-tollway-cost-usd"] != "0.000000"
        upstream.usage = GOOD
        other = _chat(port, key_b)
        assert other.status_code == 200
        # The flush interval is 10 ms; before, every later flush raised and nothing was applied.
        assert _usage_row_appears(cfg, other.headers["x-request-id"], within=3.0)
        assert _usage_row_appears(cfg, absurd.headers["x-request-id"], within=3.0)
    finally:
        _stop(proc)
    # A journal left by a gateway without the bound holds a charge the ledger cannot take.
    assert cfg.database.url.startswith("sqlite:///")
    left = rid()
    _journal_by_hand(Path(cfg.database.url.removeprefix("sqlite:///")),
                     [Charge(left, a, 5_000, None, _poison(), 1), Charge(rid(), b, 1_000, None, dict(_poison(),
                      completion_tokens=3), 2)])
    proc = _serve(cfg, port)  # before: exit 3 at start-up, every time
    try:
        assert _chat(port, key_b).status_code == 200
        verify = _cli(cfg, "ledger", "verify")
        assert verify.returncode == 1, verify.stderr
        problems = json.loads(verify.stdout)["problems"]
        assert len(problems) == 1 and left in problems[0] and "set aside" in problems[0], problems
        resolved = _cli(cfg, "ledger", "resolve", left, "--charge")
        assert resolved.returncode == 0 and json.loads(resolved.stdout)["charged_usd"] == "0.005000", resolved.stderr
        assert _cli(cfg, "ledger", "verify").returncode == 0
    finally:
        _stop(proc)


def _tenant_there(cfg: Config, tenant_id: str) -> bool:
    async def read(s: Services) -> bool:
        async with s.store.read() as conn:
            row = (await conn.execute(sa.select(tenants.c.deleted_at).where(tenants.c.id == tenant_id))).first()
        return row is not None and row[0] is None

    return _run(cfg, read)  # type: ignore[no-any-return]


def test_the_cli_refuses_to_delete_a_tenant_the_serving_gateway_may_hold(make_config: Callable[..., Config],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    cfg = make_config(server={"port": port})
    [(tid, _)] = _tenants(cfg, 1)
    monkeypatch.delenv("TOLLWAY_ADMIN_TOKEN", raising=False)
    with ServingLock(Path(cfg.database.url.removeprefix("sqlite:///")), exclusive=True):  # a gateway serves
        refused = _cli(cfg, "tenants", "delete", tid)
        assert refused.returncode != 0 and "running `tollway serve`" in refused.stderr, refused.stderr
        assert "TOLLWAY_ADMIN_TOKEN" in refused.stderr and _tenant_there(cfg, tid)
        unanswered = _cli(cfg, "tenants", "delete", tid, env={"TOLLWAY_ADMIN_TOKEN": ADMIN_TOKEN})
        assert unanswered.returncode != 0 and "did not answer" in unanswered.stderr, unanswered.stderr
        assert _tenant_there(cfg, tid)
    deleted = _cli(cfg, "tenants", "delete", tid)  # nobody serves: the CLI deletes itself
    assert deleted.returncode == 0 and json.loads(deleted.stdout)["already_deleted"] is False
    assert not _tenant_there(cfg, tid)


@pytest.mark.slow
def test_the_cli_hands_a_tenant_deletion_to_the_running_gateway(
        make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
        monkeypatch: pytest.MonkeyPatch) -> None:
    upstream = Upstream()
    port = free_port()
    cfg = _config(make_config, serve_app(upstream.app()).url, port)
    [(tid, key), (_, other_key)] = _tenants(cfg, 2)
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", ADMIN_TOKEN)  # the gateway's and the CLI's
    proc = _serve(cfg, port)
    try:
        assert _chat(port, key).status_code == 200
        result = _cli(cfg, "tenants", "delete", tid)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["tenant_id"] == tid and not _tenant_there(cfg, tid)
        log = Path(cfg.source).with_suffix(f".{port}.log").read_text()
        assert '"event":"tenant_deleted"' in log  # the gateway deleted it, with its holds and journal
        assert _chat(port, key).status_code == 401 and _chat(port, other_key).status_code == 200
        verify = _cli(cfg, "ledger", "verify")
        assert verify.returncode == 0, verify.stdout
    finally:
        _stop(proc)


def test_a_cli_deletion_first_applies_what_a_dead_gateway_journaled(make_config: Callable[..., Config]) -> None:
    """A gateway killed before its flush leaves charges in the journal; deleting the tenant
    from the CLI before the next start must not leave them without a wallet."""
    cfg = make_config()
    [(tid, _)] = _tenants(cfg, 1)
    database = Path(cfg.database.url.removeprefix("sqlite:///"))
    _journal_by_hand(database, [Charge(rid(), tid, 2_000, None, dict(_poison(), completion_tokens=3), 1)])
    deleted = _cli(cfg, "tenants", "delete", tid)
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["balance_usd"] == "9.998000"  # the charge went into the books first
    assert not list(database.parent.glob(database.name + "-charges.[0-9]*"))
    verify = _cli(cfg, "ledger", "verify")
    assert verify.returncode == 0, verify.stdout
