"""The public security page: generated from the running config, every claim backed by a
test that exists, every enabled route listed; `config check` prints the dashboard tables."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerThread
from tollway.app import create_app
from tollway.config import Config
from tollway.dashboard.security import claims

ROOT = Path(__file__).parents[1]
RICH = {
    "providers": {"echo": {"type": "echo"},
                  "cf": {"type": "openai", "base_url": "https://gateway.ai.cloudflare.com/v1/a/b/openai",
                         "api_key_env": "CF_KEY", "cf_collect_log_payload": False}},
    "models": [{"id": "demo/echo", "provider": "echo", "upstream": "echo-1", "input_usd_per_mtok": "1",
                "output_usd_per_mtok": "2"},
               {"id": "cf/gpt", "provider": "cf", "upstream": "gpt-4o-mini", "input_usd_per_mtok": "1",
                "output_usd_per_mtok": "2"}],
    "attribution": {"header": "cf-aig-metadata"},
    "stripe": {},
    "dashboard": {"public_url": "https://gw.example.org"},
    "security": {"contact": "https://example.org/security"},
}


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.name.startswith("test_")}


def test_every_claim_names_a_test_that_exists(make_config: Callable[..., Config]) -> None:
    named = 0
    for cfg in (make_config(), make_config(**RICH)):
        for claim in claims(cfg):
            assert claim.proofs, claim.title
            for proof in claim.proofs:
                file, _, name = proof.partition("::")
                path = ROOT / file
                assert path.is_file(), f"{claim.title}: {file} does not exist"
                assert name in _tests_in(path), f"{claim.title}: {proof} is not a test in this repository"
                named += 1
    assert named > 20


def _security_page(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
                   **sections: Any) -> str:
    server = serve_app(create_app(make_config(**sections), provider_keys={}, migrate=True))
    try:
        r = httpx.get(server.url + "/security", timeout=30)
        assert r.status_code == 200
        return r.text
    finally:
        server.stop()


def test_security_page_changes_with_the_config_after_a_restart(make_config: Callable[..., Config],
                                                               serve_app: Callable[[Any], ServerThread]) -> None:
    first = _security_page(make_config, serve_app, retention={"access_log_days": 30})
    assert "deleted after 30 days" in first and "deleted after 9 days" not in first
    second = _security_page(make_config, serve_app, retention={"access_log_days": 9})
    assert "deleted after 9 days" in second and "deleted after 30 days" not in second


def test_security_page_lists_providers_headers_and_every_enabled_route(
        make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_x")
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "whsec_x")
    cfg = make_config(**RICH)
    server = serve_app(create_app(cfg, provider_keys={"cf": None}, migrate=True))
    page = httpx.get(server.url + "/security", timeout=30).text
    assert "https://gateway.ai.cloudflare.com/v1/a/b/openai" in page
    assert "cf-aig-collect-log-payload: false" in page and "attribution header cf-aig-metadata" in page
    assert "https://example.org/security" in page
    from tollway.surface import describe

    for route in describe(cfg)["routes"]:
        if route.get("enabled", True):
            assert f"<code>{route['path']}</code>" in page, route["path"]
    assert "sk_test_x" not in page and "whsec_x" not in page


def test_security_txt_is_off_without_a_security_table(make_config: Callable[..., Config],
                                                      serve_app: Callable[[Any], ServerThread]) -> None:
    server = serve_app(create_app(make_config(), provider_keys={}, migrate=True))
    assert httpx.get(server.url + "/.well-known/security.txt").status_code == 404
    assert httpx.get(server.url + "/dashboard/keys").status_code == 404  # no [dashboard] table: no dashboard
    assert httpx.get(server.url + "/security").status_code == 200


def test_config_check_prints_the_dashboard_and_security_tables(tmp_path: Path) -> None:
    from tests.conftest import DEMO_MODELS, to_toml

    cfg = tmp_path / "tollway.toml"
    cfg.write_text(to_toml({**DEMO_MODELS, "dashboard": {"oidc_issuer": "https://ada.clerk.accounts.dev",
                                                         "oidc_client_id": "client_abc"},
                            "security": {"contact": "mailto:sec@example.org"}}), encoding="utf-8")
    env = {**os.environ, "TOLLWAY_CONFIG": str(cfg), "TOLLWAY_OIDC_CLIENT_SECRET": "oidc-secret-value"}
    text = subprocess.run([sys.executable, "-m", "tollway", "config", "check"], capture_output=True, text=True,
                          env=env, timeout=60, check=True).stdout
    assert "OIDC https://ada.clerk.accounts.dev" in text and "$TOLLWAY_OIDC_CLIENT_SECRET" in text
    assert "TOLLWAY_SESSION_SECRET" in text and "security.txt contact mailto:sec@example.org" in text
    assert "oidc-secret-value" not in text
    out = subprocess.run([sys.executable, "-m", "tollway", "config", "check", "--json"], capture_output=True,
                         text=True, env=env, timeout=60, check=True).stdout
    surface = json.loads(out)["surface"]
    assert surface["dashboard"]["oidc_client_secret_env"] == "TOLLWAY_OIDC_CLIENT_SECRET"
    assert surface["security"]["contact"] == "mailto:sec@example.org"
    assert "oidc-secret-value" not in out
