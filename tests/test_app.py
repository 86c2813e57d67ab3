"""The application shell: health, readiness, the admin API and its token, the route table."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.routing import Mount, Route

from tests.conftest import ServerThread
from tollway.app import GC_THRESHOLDS, ROUTE_TABLE, create_app
from tollway.config import CONFIG_ENV, Config
from tollway.store.db import Store

TOKEN = "admin-token-for-tests-0123456789"


@pytest.fixture
def gateway(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
            monkeypatch: pytest.MonkeyPatch, backend: dict[str, Any]) -> tuple[ServerThread, Config]:
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", TOKEN)
    cfg = make_config(**backend)
    return serve_app(create_app(cfg, provider_keys={}, migrate=True)), cfg


def admin(url: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, url + "/admin" + path, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30,
                         **kw)


def test_health_and_readiness(gateway: tuple[ServerThread, Config]) -> None:
    server, _ = gateway
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(server.url + "/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    assert r.headers["x-request-id"].startswith("req_")


def test_start_refused_until_migrated(make_config: Callable[..., Config]) -> None:
    app = create_app(make_config(), provider_keys={}, migrate=False)

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(RuntimeError, match="tollway migrate"):
        asyncio.run(start())


def test_admin_api_full_cycle(gateway: tuple[ServerThread, Config]) -> None:
    server, _ = gateway
    url = server.url
    tenant = admin(url, "POST", "/tenants", json={"name": "Ada", "email": "ada@example.com"}).json()
    tid = tenant["tenant_id"]
    key = admin(url, "POST", f"/tenants/{tid}/keys", json={"name": "ci"}).json()
    assert key["key"].startswith("ak_")
    listed = admin(url, "GET", f"/tenants/{tid}/keys").json()
    assert [k["id"] for k in listed["keys"]] == [key["key_id"]]
    for _ in range(3):
        credited = admin(url, "POST", f"/tenants/{tid}/wallet/credit",
                         json={"amount_usd": "2.50", "reference": "inv-1"}).json()
    assert credited == {"applied": False, "balance_usd": "2.500000"}
    assert admin(url, "GET", f"/tenants/{tid}/wallet").json()["balance_usd"] == "2.500000"
    assert admin(url, "GET", "/ledger/verify").json() == {"ok": True, "problems": []}
    models = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {key['key']}"})
    assert models.status_code == 200
    assert admin(url, "POST", f"/keys/{key['key_id']}/revoke").status_code == 200
    after = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {key['key']}"})
    assert after.status_code == 401


def test_admin_api_rejects_bad_input_with_openai_errors(gateway: tuple[ServerThread, Config]) -> None:
    server, _ = gateway
    r = admin(server.url, "POST", "/tenants/tn_nope/wallet/credit", json={"amount_usd": "abc", "reference": "x"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = admin(server.url, "GET", "/tenants/tn_nope")
    assert r.status_code == 404 and "error" in r.json()


def test_admin_token_required_and_openapi_published(gateway: tuple[ServerThread, Config]) -> None:
    server, _ = gateway
    assert httpx.get(server.url + "/admin/tenants/x").status_code == 401
    bad = httpx.get(server.url + "/admin/tenants/x", headers={"authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    spec = admin(server.url, "GET", "/openapi.json").json()
    assert "/tenants" in spec["paths"] and "/keys/{key_id}/revoke" in spec["paths"]


def test_admin_api_is_off_without_token(make_config: Callable[..., Config],
                                        serve_app: Callable[[Any], ServerThread],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOLLWAY_ADMIN_TOKEN", raising=False)
    server = serve_app(create_app(make_config(), provider_keys={}))
    r = httpx.post(server.url + "/admin/tenants", json={}, headers={"authorization": "Bearer x"})
    assert r.status_code == 404
    assert httpx.get(server.url + "/admin/openapi.json").status_code == 404


def test_route_table_matches_the_app(make_config: Callable[..., Config]) -> None:
    app = create_app(make_config(), provider_keys={})
    served: set[str] = set()
    for route in app.routes:
        if isinstance(route, Mount):
            served.add(route.path + "/*")
        elif isinstance(route, Route):
            served.add(route.path)
    listed = {path for path, *_ in ROUTE_TABLE}
    assert served <= listed, f"served but not in ROUTE_TABLE: {served - listed}"


def test_migrations_apply_and_are_current(backend: dict[str, Any], make_config: Callable[..., Config]) -> None:
    cfg = make_config(**backend)

    async def run() -> bool:
        store = Store(cfg.database.url)
        try:
            await store.migrate()
            await store.migrate()  # idempotent
            return await store.migrations_current()
        finally:
            await store.close()

    assert asyncio.run(run()) is True


def test_serving_process_tunes_the_cycle_collector(make_config: Callable[..., Config]) -> None:
    """`tollway serve`'s factory freezes what start-up left and raises the first GC
    threshold once the app has started (app.serve_gc; docs/performance-history.md has the numbers);
    an app built any other way (tests, embedding) leaves the interpreter's settings alone.
    In a child process: the collector's settings are process-wide."""
    cfg = make_config()
    script = (
        "import asyncio, gc, json\n"
        "from tollway import config\n"
        "from tollway.app import app_from_env, create_app\n"
        "def settings():\n"
        "    return [list(gc.get_threshold()), gc.get_freeze_count()]\n"
        "async def started(app):\n"
        "    async with app.router.lifespan_context(app):\n"
        "        return settings()\n"
        "async def main():\n"
        "    before = settings()\n"
        "    embedded = await started(create_app(config.load(config.find_config_path(None)), migrate=True))\n"
        "    served = await started(app_from_env())\n"
        "    print(json.dumps([before, embedded, served]))\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, CONFIG_ENV: str(cfg.source)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    before, embedded, served = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == [list(gc.get_threshold()), 0] and embedded == before
    assert served[0] == list(GC_THRESHOLDS) and served[1] > 10_000  # start-up's objects are frozen


def test_admin_credit_with_a_known_reference_and_another_amount_is_409(gateway: tuple[ServerThread, Config]) -> None:
    server, _ = gateway
    tid = admin(server.url, "POST", "/tenants", json={"name": "Ada"}).json()["tenant_id"]
    path = f"/tenants/{tid}/wallet/credit"
    assert admin(server.url, "POST", path, json={"amount_usd": "5.00", "reference": "inv-7"}).json()["applied"]
    r = admin(server.url, "POST", path, json={"amount_usd": "7.00", "reference": "inv-7"})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "reference_conflict" and "inv-7" in r.json()["error"]["message"]
    same = admin(server.url, "POST", path, json={"amount_usd": "5.000000", "reference": "inv-7"})
    assert same.status_code == 200 and same.json() == {"applied": False, "balance_usd": "5.000000"}
    assert admin(server.url, "GET", f"/tenants/{tid}/wallet").json()["balance_usd"] == "5.000000"


def test_admin_numbers_and_references_out_of_range_are_400(gateway: tuple[ServerThread, Config]) -> None:
    """Each of these reached the database and failed there (a 500 on PostgreSQL: BIGINT or
    VARCHAR(120) overflow) instead of a clear error naming the field."""
    server, _ = gateway
    tid = admin(server.url, "POST", "/tenants", json={"name": "Ada"}).json()["tenant_id"]
    credit = f"/tenants/{tid}/wallet/credit"
    for body, param in (({"amount_usd": "99999999999999999999", "reference": "big"}, "amount_usd"),
                        ({"amount_usd": "1.00", "reference": "r" * 150}, "reference")):
        r = admin(server.url, "POST", credit, json=body)
        assert r.status_code == 400 and param in r.text, r.text
    for body in ({"spend_limit_usd": "99999999999999999999", "spend_limit_period": "day"},
                 {"expires_at": 2 ** 70}, {"expires_at": -1}):
        r = admin(server.url, "POST", f"/tenants/{tid}/keys", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] in body, r.text
    assert admin(server.url, "GET", f"/tenants/{tid}/wallet").json()["balance_usd"] == "0.000000"
    assert admin(server.url, "GET", "/ledger/verify").json() == {"ok": True, "problems": []}


def test_admin_validation_errors_are_openai_style_and_echo_nothing(gateway: tuple[ServerThread, Config]) -> None:
    server, _ = gateway
    r = httpx.post(server.url + "/admin/tenants", content=b'{"name": "secret-looking-input',
                   headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert "secret-looking-input" not in r.text
    r = admin(server.url, "POST", "/tenants", json={"name": "x" * 500})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name" and "x" * 50 not in r.text, r.text


def test_every_admin_answer_is_no_store(gateway: tuple[ServerThread, Config]) -> None:
    """A key is shown once, in the answer that creates it: no cache on the way may keep it."""
    server, _ = gateway
    url = server.url
    tid = admin(url, "POST", "/tenants", json={"name": "Ada"}).json()["tenant_id"]
    answers = [admin(url, "POST", f"/tenants/{tid}/keys", json={"name": "ci"}),
               admin(url, "GET", f"/tenants/{tid}"), admin(url, "GET", f"/tenants/{tid}/export"),
               admin(url, "GET", "/tenants/tn_nope"), httpx.get(url + "/admin/tenants/x")]
    assert answers[0].json()["key"].startswith("ak_")
    assert [a.headers.get("cache-control") for a in answers] == ["no-store"] * len(answers)


def test_credit_reference_too_long_for_the_ledger_is_a_clear_400(gateway: tuple[ServerThread, Config]) -> None:
    """The entry id `manual:<tenant>:<reference>` must fit ledger_entries.id (120) now and
    after a deletion moves it to the longer pseudonym; PostgreSQL enforces the length."""
    server, cfg = gateway
    url = server.url
    tid = admin(url, "POST", "/tenants", json={"name": "Ada"}).json()["tenant_id"]
    for n in (100, 90):
        r = admin(url, "POST", f"/tenants/{tid}/wallet/credit", json={"amount_usd": "1.00", "reference": "r" * n})
        assert r.status_code == 400, (n, r.text)
        assert r.json()["error"]["param"] == "reference" and "80 characters" in r.json()["error"]["message"]
    r = admin(url, "POST", f"/tenants/{tid}/wallet/credit", json={"amount_usd": "1.00", "reference": "r" * 80})
    assert r.status_code == 200, r.text
    out = subprocess.run([sys.executable, "-m", "tollway", "wallet", "credit", "--tenant", tid, "--amount", "1.00",
                          "--reference", "r" * 100, "--config", cfg.source],
                         capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "80 characters" in out.stderr, out.stderr
    gone = admin(url, "DELETE", f"/tenants/{tid}")  # the 80-character reference still fits under the pseudonym
    assert gone.status_code == 200, gone.text
    assert admin(url, "GET", "/ledger/verify").json() == {"ok": True, "problems": []}
