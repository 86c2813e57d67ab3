"""The operator CLI: every command's --json output is exactly one JSON object; errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def cli(tmp_path: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOLLWAY_CONFIG": str(tmp_path / "tollway.toml")}
    result = subprocess.run([sys.executable, "-m", "tollway", *args], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=60)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def one_object(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    text = result.stdout.strip()
    assert "\n" not in text, f"more than one line on stdout: {text!r}"
    obj = json.loads(text)
    assert isinstance(obj, dict)
    return obj


def test_every_command_prints_one_json_object(tmp_path: Path) -> None:
    assert one_object(cli(tmp_path, "init", "--json"))["written"] == "tollway.toml"
    assert one_object(cli(tmp_path, "config", "check", "--json"))["ok"] is True
    assert one_object(cli(tmp_path, "migrate", "--json"))["migrated"] is True
    tenant = one_object(cli(tmp_path, "tenants", "create", "--name", "Ada", "--email", "ada@example.com", "--json"))
    tid = tenant["tenant_id"]
    assert one_object(cli(tmp_path, "tenants", "show", tid, "--json"))["email"] == "ada@example.com"
    created = one_object(cli(tmp_path, "keys", "create", "--tenant", tid, "--name", "laptop", "--json"))
    assert created["key"].startswith("ak_") and created["key_id"].startswith("key_")
    listed = one_object(cli(tmp_path, "keys", "list", "--tenant", tid, "--json"))
    assert [k["id"] for k in listed["keys"]] == [created["key_id"]]
    assert created["key"] not in json.dumps(listed)  # shown once, at creation only
    assert "key_hash" not in listed["keys"][0]
    credit = one_object(cli(tmp_path, "wallet", "credit", "--tenant", tid, "--amount", "5.00", "--reference", "r1",
                            "--json"))
    assert credit == {"tenant_id": tid, "applied": True, "balance_usd": "5.000000"}
    again = one_object(cli(tmp_path, "wallet", "credit", "--tenant", tid, "--amount", "5.00", "--reference", "r1",
                           "--json"))
    assert again["applied"] is False and again["balance_usd"] == "5.000000"
    assert one_object(cli(tmp_path, "wallet", "show", "--tenant", tid, "--json"))["balance_usd"] == "5.000000"
    assert one_object(cli(tmp_path, "ledger", "verify", "--json")) == {"ok": True, "problems": []}
    revoked = one_object(cli(tmp_path, "keys", "revoke", created["key_id"], "--json"))
    assert revoked["key_id"] == created["key_id"] and revoked["revoked_at"]


@pytest.mark.parametrize(
    "args",
    [
        ("wallet", "credit", "--tenant", "tn_missing", "--amount", "5.00", "--reference", "x"),
        ("wallet", "credit", "--tenant", "tn_missing", "--amount", "5.0000001", "--reference", "x"),
        ("wallet", "credit", "--tenant", "tn_missing", "--amount", "-1", "--reference", "x"),
        ("wallet", "credit", "--tenant", "tn_missing", "--amount", "99999999999999999999", "--reference", "x"),
        ("keys", "create", "--tenant", "tn_missing", "--spend-limit", "99999999999999999999", "--spend-period", "day"),
        ("keys", "revoke", "key_missing"),
        ("keys", "create", "--tenant", "tn_missing"),
        ("tenants", "show", "tn_missing"),
    ],
)
def test_errors_are_one_line_on_stderr_and_non_zero(tmp_path: Path, args: tuple[str, ...]) -> None:
    cli(tmp_path, "init")
    result = cli(tmp_path, *args, "--json", ok=False)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    cli(tmp_path, "init")
    before = (tmp_path / "tollway.toml").read_text()
    result = cli(tmp_path, "init", ok=False)
    assert result.returncode == 1 and "already exists" in result.stderr
    assert (tmp_path / "tollway.toml").read_text() == before


def test_missing_config_says_how_to_make_one(tmp_path: Path) -> None:
    result = cli(tmp_path, "wallet", "show", "--tenant", "x", ok=False)
    assert result.returncode == 1 and "tollway init" in result.stderr


def test_wallet_credit_with_a_known_reference_and_another_amount_is_a_conflict(tmp_path: Path) -> None:
    cli(tmp_path, "init")
    cli(tmp_path, "migrate")
    tid = one_object(cli(tmp_path, "tenants", "create", "--name", "Ada", "--json"))["tenant_id"]
    cli(tmp_path, "wallet", "credit", "--tenant", tid, "--amount", "5.00", "--reference", "inv-7")
    other = cli(tmp_path, "wallet", "credit", "--tenant", tid, "--amount", "50.00", "--reference", "inv-7", ok=False)
    assert other.returncode == 1 and other.stdout == ""
    assert "inv-7" in other.stderr and "5.000000" in other.stderr and len(other.stderr.strip().splitlines()) == 1
    same = one_object(cli(tmp_path, "wallet", "credit", "--tenant", tid, "--amount", "5", "--reference", "inv-7",
                          "--json"))
    assert same["applied"] is False and same["balance_usd"] == "5.000000"
