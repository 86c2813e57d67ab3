"""Dashboard sign-in with Clerk as the OIDC issuer from the [auth] table, and the keys pages
in Clerk mode: a person lands on the tenant their Clerk keys belong to, and creating or
revoking a key there goes to Clerk (a revoke evicting the key before the page reloads).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import ServerThread
from tests.fakes.clerk_api import FakeClerk
from tests.fakes.oidc_provider import CLIENT_ID, CLIENT_SECRET, FakeOIDC
from tests.fakes.page_client import PageClient
from tests.test_clerk import ADMIN, CLERK_SK, EVICT_EVENT, WHSEC
from tests.test_dashboard import oidc_round_trip
from tollway import surface
from tollway.app import create_app
from tollway.config import Config, ConfigError
from tollway.services import build
from tollway.store.schema import tenants


@pytest.fixture(autouse=True)
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLERK_SECRET_KEY", CLERK_SK)
    monkeypatch.setenv("CLERK_WEBHOOK_SIGNING_SECRET", WHSEC)
    monkeypatch.setenv("TOLLWAY_ADMIN_TOKEN", ADMIN)
    monkeypatch.setenv("TOLLWAY_OIDC_CLIENT_SECRET", CLIENT_SECRET)


@pytest.fixture
def setup(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread]
          ) -> Iterator[tuple[str, FakeClerk, FakeOIDC, Config]]:
    clerk = FakeClerk(CLERK_SK)
    clerk_url = serve_app(clerk.app()).url
    oidc = FakeOIDC(subject="user_" + secrets.token_hex(14)[:27])
    oidc.issuer = serve_app(oidc.app()).url
    cfg = make_config(auth={"issuer": "clerk", "clerk_api_url": clerk_url, "clerk_frontend_api_url": oidc.issuer,
                            "clerk_evict_events": [EVICT_EVENT]},
                      dashboard={"public_url": "http://127.0.0.1:8080", "oidc_client_id": CLIENT_ID})
    server = serve_app(create_app(cfg, provider_keys={}, migrate=True))
    yield server.url, clerk, oidc, cfg


def test_clerk_sign_in_lands_on_the_tenant_of_the_users_keys(setup: tuple[str, FakeClerk, FakeOIDC, Config]
                                                              ) -> None:
    url, clerk, oidc, cfg = setup
    user = oidc.subject
    old_key, old_id = clerk.add_key(user, name="made in clerk")
    assert httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {old_key}"}).status_code == 200
    client = PageClient(url)
    try:
        r = oidc_round_trip(client)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/keys", r.text
        listing = client.get("/dashboard/keys")
        assert listing.status_code == 200 and "made in clerk" in listing.text
        assert "spend_limit" not in listing.text, "spend limits are Tollway's own: not offered for Clerk keys"
        # A key made on the dashboard is made at Clerk for this user, and works.
        made = client.post("/dashboard/keys", {"csrf": client.csrf(), "name": "from the dashboard",
                                               "expires_in_days": "30"})
        assert made.status_code == 200 and "you will not see it again" in made.text, made.text
        [create] = [c for c in clerk.calls("/v1/api_keys") if c.method == "POST"]
        assert create.body["subject"] == user
        assert 29 * 86400 < create.body["seconds_until_expiration"] <= 30 * 86400
        key = re.search(r'value="(ak_[A-Za-z0-9_-]+)"', made.text)
        assert key is not None
        assert httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {key.group(1)}"}).status_code == 200
        # Revoking the Clerk-made key on the dashboard: revoked at Clerk, refused at once.
        assert "Revoke" in client.get(f"/dashboard/keys/{old_id}").text
        r = client.post("/dashboard/keys/revoke", {"csrf": client.csrf(), "key_id": old_id})
        assert r.status_code == 303
        assert next(k for k in clerk.keys.values() if k["id"] == old_id)["revoked"]
        assert httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {old_key}"}).status_code == 401
        # Another user's key id is not this user's to see or revoke.
        _, foreign_id = clerk.add_key("user_" + secrets.token_hex(14)[:27])
        assert client.get(f"/dashboard/keys/{foreign_id}").status_code == 404
        r = client.post("/dashboard/keys/revoke", {"csrf": client.csrf(), "key_id": foreign_id})
        assert r.status_code == 404
        assert not next(k for k in clerk.keys.values() if k["id"] == foreign_id)["revoked"]
    finally:
        client.close()

    async def subjects() -> list[Any]:
        svc = build(cfg)
        try:
            async with svc.store.read() as conn:
                return list((await conn.execute(sa.select(tenants.c.external_id).where(
                    tenants.c.external_id.is_not(None)))).scalars().all())
        finally:
            await svc.close()

    assert asyncio.run(subjects()) == [f"clerk:{user}"], "the keys' tenant and the signed-in person's are one"


def test_config_check_and_security_page_state_the_clerk_revocation_bound(
        make_config: Callable[..., Config]) -> None:
    cfg = make_config(auth={"issuer": "clerk", "clerk_evict_events": [EVICT_EVENT]})
    text = surface.render_text(surface.describe(cfg))
    assert "issued by clerk" in text
    assert f"immediate for a revocation made through Tollway (dashboard, CLI, admin API) or signalled by a " \
           f"verified Clerk webhook event ({EVICT_EVENT}" in text
    assert "stops working within 60 s" in text
    assert "/webhooks/clerk" in text and "CLERK_SECRET_KEY" in text and "CLERK_WEBHOOK_SIGNING_SECRET" in text
    from tollway.dashboard.security import claims

    [revocation] = [c for c in claims(cfg) if c.title == "Revocation"]
    assert "Clerk" in revocation.text and "within 60 s" in revocation.text
    plain = surface.render_text(surface.describe(make_config()))
    assert "issued by tollway" in plain and "/webhooks/clerk" in plain  # listed, marked off


@pytest.mark.parametrize(("auth", "dashboard", "problem"), [
    ({"issuer": "okta"}, None, "auth.issuer"),
    ({"issuer": "clerk", "clerk_api_url": "api.clerk.com"}, None, "auth.clerk_api_url"),
    ({"issuer": "clerk", "clerk_evict_events": ["user.deleted"]}, None, "auth.clerk_evict_events[0]"),
    ({"issuer": "clerk", "clerk_timeout_seconds": 120}, None, "auth.clerk_timeout_seconds"),
    ({"issuer": "clerk", "clerk_evict_events": "apiKey.revoked"}, None, "auth.clerk_evict_events"),
    ({"issuer": "clerk", "clerk_frontend_api_url": "https://clerk.a.example"},
     {"oidc_issuer": "https://other.example", "oidc_client_id": "x"}, "dashboard.oidc_issuer"),
    ({"issuer": "clerk", "clerk_frontend_api_url": "https://clerk.a.example"}, {}, "dashboard.oidc_client_id"),
])
def test_clerk_config_mistakes_name_the_key(make_config: Callable[..., Config], auth: dict[str, Any],
                                            dashboard: dict[str, Any] | None, problem: str) -> None:
    sections: dict[str, Any] = {"auth": auth}
    if dashboard is not None:
        sections["dashboard"] = dashboard
    with pytest.raises(ConfigError, match=re.escape(problem)):
        make_config(**sections)


def test_serve_refuses_to_start_without_the_clerk_secret(make_config: Callable[..., Config],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLERK_SECRET_KEY")
    cfg = make_config(auth={"issuer": "clerk"})
    with pytest.raises(ConfigError, match="CLERK_SECRET_KEY"):
        create_app(cfg, provider_keys={}, migrate=True)


def test_clerk_keys_take_their_own_rate_limits_on_the_dashboard(setup: tuple[str, FakeClerk, FakeOIDC, Config]
                                                                ) -> None:
    from tollway.store.schema import api_keys

    url, clerk, oidc, cfg = setup
    unseen_key, unseen_id = clerk.add_key(oidc.subject, name="not used yet")

    async def own(key_id: str) -> Any:
        svc = build(cfg)
        try:
            async with svc.store.read() as conn:
                return (await conn.execute(sa.select(api_keys.c.requests_per_minute, api_keys.c.tokens_per_minute)
                                           .where(api_keys.c.id == key_id))).first()
        finally:
            await svc.close()

    client = PageClient(url)
    try:
        assert oidc_round_trip(client).status_code == 303
        made = client.post("/dashboard/keys", {"csrf": client.csrf(), "name": "capped", "requests_per_minute": "2",
                                               "tokens_per_minute": ""})
        assert made.status_code == 200 and "you will not see it again" in made.text, made.text
        [made_id] = [k["id"] for k in clerk.keys.values() if k["name"] == "capped"]
        assert tuple(asyncio.run(own(made_id))) == (2, None)
        form = {"csrf": client.csrf(f"/dashboard/keys/{unseen_id}/limits"), "key_id": unseen_id,
                "requests_per_minute": "7"}
        early = client.post("/dashboard/keys/limits", form)  # no mirrored row yet to keep it on
        assert early.status_code == 409 and "first request" in early.text
        assert httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {unseen_key}"}).status_code == 200
        assert client.post("/dashboard/keys/limits", form).status_code == 303
        assert tuple(asyncio.run(own(unseen_id))) == (7, None)
    finally:
        client.close()
