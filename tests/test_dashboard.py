"""The dashboard over real HTTP: sign-in links, OIDC, CSRF, headers, tenant isolation, pages.

The gateway runs under uvicorn on loopback with a fake OIDC provider beside it; pages are
fetched with a cookie-keeping client (tests/fakes/page_client.py). The browser walk-through
is tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import ServerThread
from tests.fakes.harness import Gateway
from tests.fakes.oidc_provider import CLIENT_ID, CLIENT_SECRET, FakeOIDC
from tests.fakes.page_client import PageClient
from tollway.services import Services
from tollway.store.schema import api_keys, ledger_entries, tenants

SECURITY = {"contact": "mailto:security@example.org", "expires_days": 30, "policy": "https://example.org/policy"}


def dashboard_sections(public_url: str = "http://127.0.0.1:8080", issuer: str = "") -> dict[str, Any]:
    d: dict[str, Any] = {"public_url": public_url}
    if issuer:
        d.update(oidc_issuer=issuer, oidc_client_id=CLIENT_ID)
    return {"dashboard": d, "security": SECURITY}


@pytest.fixture
def oidc(serve_app: Callable[[Any], ServerThread], monkeypatch: pytest.MonkeyPatch) -> FakeOIDC:
    monkeypatch.setenv("TOLLWAY_OIDC_CLIENT_SECRET", CLIENT_SECRET)
    fake = FakeOIDC()
    fake.issuer = serve_app(fake.app()).url
    return fake


@pytest.fixture
def limits() -> dict[str, int]:
    """The operator's [limits] (none here); a test parametrizes it to set some."""
    return {}


@pytest.fixture
def gw(launch: Callable[..., Gateway], oidc: FakeOIDC, limits: dict[str, int]) -> Gateway:
    sections = dashboard_sections(issuer=oidc.issuer) | ({"limits": limits} if limits else {})
    return launch("http://127.0.0.1:9", **sections)


@pytest.fixture
def pages(gw: Gateway) -> Iterator[Callable[[], PageClient]]:
    made: list[PageClient] = []

    def make() -> PageClient:
        made.append(PageClient(gw.url))
        return made[-1]

    yield make
    for c in made:
        c.close()


def link_for(gw: Gateway, tenant_id: str) -> str:
    """`tollway dashboard-link --json`, run as the operator would, against the serving gateway's database."""
    env = {**os.environ, "TOLLWAY_CONFIG": gw.cfg.source}
    out = subprocess.run([sys.executable, "-m", "tollway", "dashboard-link", "--tenant", tenant_id, "--json"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout)
    assert obj["tenant_id"] == tenant_id and obj["expires_in_seconds"] == 900
    assert obj["url"].startswith("http://127.0.0.1:8080/dashboard/link/")
    return str(obj["url"]).removeprefix("http://127.0.0.1:8080")


def sign_in(client: PageClient, path: str) -> None:
    page = client.get(path)
    assert page.status_code == 200, page.text
    r = client.post(path, {"csrf": client.csrf(path)})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/keys", r.text


def signed_in(gw: Gateway, pages: Callable[[], PageClient], tenant_id: str | None = None) -> PageClient:
    client = pages()
    sign_in(client, link_for(gw, tenant_id or gw.tenant_id))
    return client


def new_tenant(gw: Gateway) -> tuple[str, str, str]:
    async def make(svc: Services) -> tuple[str, str, str]:
        t = await svc.tenants.create(name="Grace", email="grace@example.org")
        k = await svc.keys.create(t["tenant_id"], name="grace-key")
        await svc.ledger.credit(t["tenant_id"], 3_000_000, f"fund-{t['tenant_id']}")
        return t["tenant_id"], k["key_id"], k["key"]
    return gw.run(make)


# --- sign-in links ---------------------------------------------------------------------------


def test_sign_in_link_works_once(gw: Gateway, pages: Callable[[], PageClient]) -> None:
    path = link_for(gw, gw.tenant_id)
    first = pages()
    sign_in(first, path)
    home = first.get("/dashboard/keys")
    assert home.status_code == 200 and gw.tenant_id in home.text
    again = pages()
    page = again.get(path)
    assert page.status_code == 200  # the page itself uses nothing up: mail scanners fetch links
    r = again.post(path, {"csrf": again.csrf(path)})
    assert r.status_code == 400 and "cannot be used" in r.text
    assert again.get("/dashboard/keys").headers["location"] == "/dashboard/signin"


def test_expired_or_altered_link_does_not_sign_in(gw: Gateway, pages: Callable[[], PageClient],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import itsdangerous.timed

    real = time.time
    monkeypatch.setattr(itsdangerous.timed.time, "time", lambda: real() - 901)
    old = link_for_in_process(gw)
    monkeypatch.setattr(itsdangerous.timed.time, "time", real)
    fresh = link_for_in_process(gw)
    for path in (old, fresh[:-2] + ("AA" if not fresh.endswith("AA") else "BB")):
        client = pages()
        assert client.get(path).status_code == 400
        r = client.post(path, {"csrf": client.csrf(fresh)})  # a genuine token: only the link is wrong
        assert r.status_code == 400
        assert client.get("/dashboard/keys").status_code == 303


def link_for_in_process(gw: Gateway) -> str:
    from tollway.dashboard.sessions import Sessions

    async def make(svc: Services) -> str:
        assert svc.config.dashboard is not None
        sessions, _ = Sessions.from_config(svc.config.dashboard, svc.store.sqlite_file, svc.store)
        return sessions.link(gw.tenant_id)
    return gw.run(make).removeprefix("http://127.0.0.1:8080")


def test_sign_in_link_for_unknown_tenant_is_refused_by_the_cli(gw: Gateway) -> None:
    env = {**os.environ, "TOLLWAY_CONFIG": gw.cfg.source}
    out = subprocess.run([sys.executable, "-m", "tollway", "dashboard-link", "--tenant", "tn_nobody"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("error: no tenant tn_nobody")


# --- OIDC --------------------------------------------------------------------------------------


def oidc_round_trip(client: PageClient, state: str | None = None) -> Any:
    start = client.get("/dashboard/signin/oidc")
    assert start.status_code == 303, start.text
    import httpx

    at_issuer = httpx.get(start.headers["location"], follow_redirects=False)
    assert at_issuer.status_code == 302
    back = at_issuer.headers["location"]
    assert back.startswith("http://127.0.0.1:8080/dashboard/oidc/callback?")
    path = back.removeprefix("http://127.0.0.1:8080")
    if state is not None:
        path = re.sub(r"state=[^&]+", f"state={state}", path)
    return client.get(path)


def test_oidc_sign_in_creates_the_tenant_once(gw: Gateway, oidc: FakeOIDC, pages: Callable[[], PageClient]) -> None:
    for _ in range(2):
        client = pages()
        r = oidc_round_trip(client)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/keys", r.text
    asked = oidc.authorize_requests[-1]
    assert asked["code_challenge_method"] == "S256" and asked["nonce"] and asked["state"]
    assert "code_verifier" in oidc.token_requests[-1]

    async def by_subject(svc: Services) -> list[Any]:
        async with svc.store.read() as conn:
            return list((await conn.execute(sa.select(tenants.c.id, tenants.c.name, tenants.c.email)
                                            .where(tenants.c.external_id.like("oidc:%")))).all())
    rows = gw.run(by_subject)
    assert len(rows) == 1 and rows[0].name == "Ada Lovelace" and rows[0].email == "ada@example.org"


@pytest.mark.parametrize("wrong", ["state", "nonce", "signing key", "audience"])
def test_oidc_callback_refuses_a_wrong_response(gw: Gateway, oidc: FakeOIDC, pages: Callable[[], PageClient],
                                                 wrong: str) -> None:
    state = None
    if wrong == "state":
        state = "not-the-state-we-sent"
    elif wrong == "nonce":
        oidc.tamper = {"nonce": "another-nonce"}
    elif wrong == "signing key":
        oidc.sign_with_other_key = True
    else:
        oidc.tamper = {"aud": "another-client"}
    client = pages()
    r = oidc_round_trip(client, state)
    assert r.status_code == 400 and "Sign-in failed" in r.text
    assert client.get("/dashboard/keys").status_code == 303  # not signed in

    async def count(svc: Services) -> int:
        async with svc.store.read() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(tenants)
                                           .where(tenants.c.external_id.is_not(None)))).scalar_one())
    assert gw.run(count) == 0


# --- CSRF, headers, isolation -----------------------------------------------------------------------


def test_every_post_without_csrf_is_403_and_changes_nothing(gw: Gateway, pages: Callable[[], PageClient]) -> None:
    client = signed_in(gw, pages)
    unused_link = link_for(gw, gw.tenant_id)
    posts = {
        "/dashboard/keys": {"name": "sneaky"},
        "/dashboard/keys/revoke": {"key_id": gw.key_id},
        "/dashboard/keys/limits": {"key_id": gw.key_id, "requests_per_minute": "1"},
        "/dashboard/wallet/topup": {"amount_usd": "20.00"},
        "/dashboard/privacy/delete": {"confirm": gw.tenant_id},
        "/dashboard/signout": {},
        unused_link: {},
    }

    def state(svc: Services) -> Any:
        async def read() -> Any:
            async with svc.store.read() as conn:
                keys = (await conn.execute(sa.select(api_keys.c.id, api_keys.c.revoked_at,
                                                     api_keys.c.requests_per_minute, api_keys.c.tokens_per_minute)
                                           .where(api_keys.c.tenant_id == gw.tenant_id))).all()
                live = (await conn.execute(sa.select(tenants.c.deleted_at).where(tenants.c.id == gw.tenant_id))).all()
            return sorted(map(tuple, keys)), list(map(tuple, live))
        return read()

    before = gw.run(state)
    for path, form in posts.items():
        for token in (None, "", "forged-token-" + "x" * 20):
            data = dict(form) if token is None else {**form, "csrf": token}
            r = client.post(path, data)
            assert r.status_code == 403, (path, token, r.status_code)
    assert gw.run(state) == before
    assert client.get("/dashboard/keys").status_code == 200  # still signed in: sign-out was refused too
    other = pages()
    sign_in(other, unused_link)  # the link was not used up by the refused POST


def test_every_page_has_the_security_headers(gw: Gateway, pages: Callable[[], PageClient]) -> None:
    client = signed_in(gw, pages)
    assert any(c.startswith("tollway_session=") for c in client.raw_set_cookies)
    for line in client.raw_set_cookies:
        if line.startswith("tollway_session="):
            attrs = {a.strip().lower() for a in line.split(";")[1:]}
            assert {"secure", "httponly", "samesite=lax", "path=/dashboard"} <= attrs, line
    paths = ["/dashboard/keys", "/dashboard/wallet", "/dashboard/usage", "/dashboard/usage.csv", "/dashboard/privacy",
             "/dashboard/privacy/export", f"/dashboard/keys/{gw.key_id}", f"/dashboard/keys/{gw.key_id}/limits",
             "/dashboard/nowhere",
             "/dashboard/static/style.css", "/dashboard/signin", "/security", "/.well-known/security.txt"]
    for path in paths:
        r = client.get(path)
        csp = r.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, path
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, path
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["referrer-policy"] == "no-referrer", path
    assert client.get("/dashboard/nowhere").status_code == 404
    for page in ("/dashboard/keys", "/dashboard/wallet", "/dashboard/usage", "/dashboard/privacy", "/security",
                 f"/dashboard/keys/{gw.key_id}/limits"):
        html = client.get(page).text
        assert "<script>" not in html and " style=" not in html and 'href="/security"' in html, page


def test_another_tenants_ids_are_404_in_urls_and_forms(gw: Gateway, pages: Callable[[], PageClient]) -> None:
    reply = gw.client().chat.completions.with_raw_response.create(
        model="demo/echo", messages=[{"role": "user", "content": "hi"}])
    request_id = reply.headers["x-request-id"]
    gw.usage_row(request_id)

    async def entry_of(svc: Services) -> str:
        async with svc.store.read() as conn:
            return str((await conn.execute(sa.select(ledger_entries.c.id)
                                           .where(ledger_entries.c.tenant_id == gw.tenant_id))).scalars().first())
    entry_id = gw.run(entry_of)
    owner = signed_in(gw, pages)
    assert owner.get(f"/dashboard/keys/{gw.key_id}").status_code == 200
    assert owner.get(f"/dashboard/wallet/entries/{entry_id}").status_code == 200
    assert owner.get(f"/dashboard/usage/requests/{request_id}").status_code == 200

    other_id, _, _ = new_tenant(gw)
    intruder = signed_in(gw, pages, other_id)
    for path in (f"/dashboard/keys/{gw.key_id}", f"/dashboard/wallet/entries/{entry_id}",
                 f"/dashboard/usage/requests/{request_id}"):
        r = intruder.get(path)
        assert r.status_code == 404 and gw.tenant_id not in r.text, path
    r = intruder.post("/dashboard/keys/revoke", {"csrf": intruder.csrf(), "key_id": gw.key_id})
    assert r.status_code == 404
    assert gw.client().chat.completions.create(model="demo/echo", messages=[{"role": "user", "content": "x"}])
    # A tenant id in a form field is ignored: the session's tenant is the only one.
    made = intruder.post("/dashboard/keys", {"csrf": intruder.csrf(), "name": "mine", "tenant_id": gw.tenant_id})
    assert made.status_code == 200
    keys_of_owner = gw.run(lambda svc: svc.keys.list(gw.tenant_id))
    assert [k["name"] for k in keys_of_owner] == ["test"]
    assert gw.tenant_id not in intruder.get("/dashboard/usage").text


# --- pages ------------------------------------------------------------------------------------


def test_key_create_validation_and_revoke(gw: Gateway, pages: Callable[[], PageClient]) -> None:
    client = signed_in(gw, pages)
    bad = client.post("/dashboard/keys", {"csrf": client.csrf(), "spend_limit": "ten", "expires_in_days": "0"})
    assert bad.status_code == 400
    assert "Enter an amount in US dollars" in bad.text and "Enter a whole number of days" in bad.text
    made = client.post("/dashboard/keys", {"csrf": client.csrf(), "name": "ci", "spend_limit": "5.00",
                                           "spend_period": "day", "expires_in_days": "30"})
    assert made.status_code == 200 and "you will not see it again" in made.text
    key = re.search(r'value="(ak_[A-Za-z0-9_-]+)"', made.text)
    assert key is not None
    ok = gw.client(api_key=key.group(1)).chat.completions.create(model="demo/echo",
                                                                 messages=[{"role": "user", "content": "x"}])
    assert ok.choices
    listing = client.get("/dashboard/keys").text
    assert key.group(1) not in listing  # shown once
    assert ">none</span>" in listing  # no rate limit ([limits] is off here, the key has none of its own)
    limited = gw.run(lambda s: s.keys.create(gw.tenant_id, name="slow", requests_per_minute=3,
                                             tokens_per_minute=40_000))
    assert "3 requests/min<br>40,000 tokens/min" in client.get("/dashboard/keys").text
    gw.run(lambda s: s.keys.set_rate_limits(limited["key_id"], requests_per_minute=None))
    assert "requests/min<br>" not in client.get("/dashboard/keys").text  # back to the default: none
    key_id = next(k["key_id"] if "key_id" in k else k["id"] for k in gw.run(lambda s: s.keys.list(gw.tenant_id))
                  if k["name"] == "ci")
    assert "Revoke" in client.get(f"/dashboard/keys/{key_id}").text
    r = client.post("/dashboard/keys/revoke", {"csrf": client.csrf(), "key_id": key_id})
    assert r.status_code == 303
    import openai

    with pytest.raises(openai.AuthenticationError):
        gw.client(api_key=key.group(1)).chat.completions.create(model="demo/echo",
                                                                messages=[{"role": "user", "content": "x"}])


# --- a customer's own rate limits ---------------------------------------------------------------


# The operator's [limits]: 5 requests and 100,000 tokens a minute per key.
operator_limits = pytest.mark.parametrize("limits", [{"requests_per_minute": 5, "tokens_per_minute": 100_000}])


def own_limits(gw: Gateway, key_id: str) -> tuple[int | None, int | None]:
    async def read(svc: Services) -> tuple[int | None, int | None]:
        async with svc.store.read() as conn:
            row = (await conn.execute(sa.select(api_keys.c.requests_per_minute, api_keys.c.tokens_per_minute)
                                      .where(api_keys.c.id == key_id))).one()
        return row.requests_per_minute, row.tokens_per_minute
    return gw.run(read)


def chat_status(gw: Gateway, key: str, n: int) -> list[int]:
    import httpx

    body = {"model": "demo/echo", "messages": [{"role": "user", "content": "hi"}]}
    return [httpx.post(gw.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"},
                       timeout=30).status_code for _ in range(n)]


def set_limits(client: PageClient, key_id: str, rpm: str = "", tpm: str = "", **extra: str) -> Any:
    form = {"csrf": client.csrf(f"/dashboard/keys/{key_id}/limits"), "key_id": key_id,
            "requests_per_minute": rpm, "tokens_per_minute": tpm, **extra}
    return client.post("/dashboard/keys/limits", form)


@operator_limits
def test_customer_creates_a_key_with_limits_at_most_the_operators_default(gw: Gateway,
                                                                         pages: Callable[[], PageClient]) -> None:
    client = signed_in(gw, pages)
    form = client.get("/dashboard/keys").text
    assert '<label for="requests_per_minute">' in form and '<label for="tokens_per_minute">' in form
    assert "default 5, the most allowed" in form and "default 100,000, the most allowed" in form
    for rpm, tpm in (("6", ""), ("0", ""), ("", "100001"), ("", "0"), ("abc", ""), ("-1", ""), ("1e3", ""),
                     ("٣", ""), ("1_0", ""), ("", "99999999999")):
        bad = client.post("/dashboard/keys", {"csrf": client.csrf(), "name": "greedy", "requests_per_minute": rpm,
                                              "tokens_per_minute": tpm})
        assert bad.status_code == 400, (rpm, tpm)
        assert 'aria-invalid="true"' in bad.text and "you will not see it again" not in bad.text
        field = "requests" if rpm else "tokens"
        assert f"{field} per minute" in bad.text and f"from 1 to {'5' if rpm else '100,000'}," in bad.text
        assert f'value="{rpm or tpm}"' in bad.text  # the entry is kept to correct
    assert [k["name"] for k in gw.run(lambda svc: svc.keys.list(gw.tenant_id))] == ["test"]  # nothing was created
    made = client.post("/dashboard/keys", {"csrf": client.csrf(), "name": "slow", "requests_per_minute": " 2 ",
                                           "tokens_per_minute": "100000"})
    assert made.status_code == 200 and "you will not see it again" in made.text
    key = re.search(r'value="(ak_[A-Za-z0-9_-]+)"', made.text)
    assert key is not None
    key_id = next(k["id"] for k in gw.run(lambda svc: svc.keys.list(gw.tenant_id)) if k["name"] == "slow")
    assert own_limits(gw, key_id) == (2, 100_000)
    assert chat_status(gw, key.group(1), 3) == [200, 200, 429]
    plain = client.post("/dashboard/keys", {"csrf": client.csrf(), "name": "plain"})  # empty: the defaults
    assert plain.status_code == 200
    plain_id = next(k["id"] for k in gw.run(lambda svc: svc.keys.list(gw.tenant_id)) if k["name"] == "plain")
    assert own_limits(gw, plain_id) == (None, None)


@operator_limits
def test_customer_sets_changes_and_clears_a_keys_limits(gw: Gateway, pages: Callable[[], PageClient]) -> None:
    client = signed_in(gw, pages)
    assert chat_status(gw, gw.key, 1) == [200]  # verified and cached with the default (5 a minute)
    assert f'href="/dashboard/keys/{gw.key_id}/limits"' in client.get("/dashboard/keys").text
    page = client.get(f"/dashboard/keys/{gw.key_id}/limits")
    assert page.status_code == 200 and '<label for="requests_per_minute">' in page.text
    r = set_limits(client, gw.key_id, rpm="2")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/keys?done=limits"
    assert own_limits(gw, gw.key_id) == (2, None)
    # The serving process dropped its cached entry: the next request is held to 2 a minute,
    # the one made before the change counting as the first.
    assert chat_status(gw, gw.key, 2) == [200, 429]
    listing = client.get("/dashboard/keys?done=limits").text
    assert "rate limits are saved" in listing and "2 requests/min" in listing
    assert 'value="2"' in client.get(f"/dashboard/keys/{gw.key_id}/limits").text  # the form shows the key's own
    assert set_limits(client, gw.key_id, rpm="1", tpm="50000").status_code == 303
    assert own_limits(gw, gw.key_id) == (1, 50_000)
    assert chat_status(gw, gw.key, 1) == [429]  # 1 a minute, already spent
    refused = set_limits(client, gw.key_id, rpm="50", tpm="50000")
    assert refused.status_code == 400 and "at most 5 requests per minute per key" in refused.text
    assert own_limits(gw, gw.key_id) == (1, 50_000)  # nothing changed
    cleared = set_limits(client, gw.key_id, tpm="50000")  # an emptied field: back to the default
    assert cleared.status_code == 303 and own_limits(gw, gw.key_id) == (None, 50_000)
    assert set_limits(client, gw.key_id, rpm="3", tpm="9", reset="1").status_code == 303  # "Use the defaults"
    assert own_limits(gw, gw.key_id) == (None, None)
    assert "5 requests/min" in client.get("/dashboard/keys").text


@operator_limits
def test_an_operators_higher_limit_can_be_kept_but_not_raised(gw: Gateway, pages: Callable[[], PageClient]) -> None:
    gw.run(lambda svc: svc.keys.set_rate_limits(gw.key_id, requests_per_minute=100, tokens_per_minute=0))
    client = signed_in(gw, pages)
    kept = set_limits(client, gw.key_id, rpm="100", tpm="0")  # unchanged: the operator granted them
    assert kept.status_code == 303 and own_limits(gw, gw.key_id) == (100, 0)
    for rpm, tpm in (("101", "0"), ("100", "1000000")):
        r = set_limits(client, gw.key_id, rpm=rpm, tpm=tpm)
        assert r.status_code == 400 and own_limits(gw, gw.key_id) == (100, 0)
    assert set_limits(client, gw.key_id, rpm="4", tpm="0").status_code == 303  # lower is fine
    assert own_limits(gw, gw.key_id) == (4, 0)
    assert set_limits(client, gw.key_id, rpm="100", tpm="0").status_code == 400  # once lowered, not raised again


def test_with_an_unlimited_default_any_limit_is_allowed(gw: Gateway, pages: Callable[[], PageClient]) -> None:
    client = signed_in(gw, pages)
    assert "default unlimited" in client.get(f"/dashboard/keys/{gw.key_id}/limits").text
    assert set_limits(client, gw.key_id, rpm="1000000000", tpm="0").status_code == 303
    assert own_limits(gw, gw.key_id) == (1_000_000_000, 0)
    r = set_limits(client, gw.key_id, rpm="1000000001")
    assert r.status_code == 400 and "from 0 (unlimited) to 1,000,000,000" in r.text
    assert own_limits(gw, gw.key_id) == (1_000_000_000, 0)


@operator_limits
def test_another_tenants_key_limits_are_404_and_unchanged(gw: Gateway, pages: Callable[[], PageClient]) -> None:
    other_id, other_key_id, _ = new_tenant(gw)
    intruder = signed_in(gw, pages, other_id)
    assert intruder.get(f"/dashboard/keys/{gw.key_id}/limits").status_code == 404
    for form in ({"requests_per_minute": "1"}, {"reset": "1"}, {"requests_per_minute": "1", "tenant_id": gw.tenant_id}):
        r = intruder.post("/dashboard/keys/limits", {"csrf": intruder.csrf(), "key_id": gw.key_id, **form})
        assert r.status_code == 404 and gw.tenant_id not in r.text
    assert own_limits(gw, gw.key_id) == (None, None)
    assert chat_status(gw, gw.key, 2) == [200, 200]
    assert set_limits(intruder, other_key_id, rpm="1").status_code == 303  # their own key, of course
    assert own_limits(gw, other_key_id) == (1, None) and own_limits(gw, gw.key_id) == (None, None)
    revoke = intruder.post("/dashboard/keys/revoke", {"csrf": intruder.csrf(), "key_id": other_key_id})
    assert revoke.status_code == 303
    late = intruder.post("/dashboard/keys/limits", {"csrf": intruder.csrf(), "key_id": other_key_id,
                                                    "requests_per_minute": "2"})
    assert late.status_code == 400 and "revoked" in late.text and own_limits(gw, other_key_id) == (1, None)


def test_usage_page_and_csv_show_requests_metadata_only(gw: Gateway, pages: Callable[[], PageClient]) -> None:
    secret_prompt = "CANARY-prompt-7f3a"
    reply = gw.client().chat.completions.with_raw_response.create(
        model="demo/echo", messages=[{"role": "user", "content": secret_prompt}])
    rid = reply.headers["x-request-id"]
    row = gw.usage_row(rid)
    client = signed_in(gw, pages)
    page = client.get("/dashboard/usage")
    assert page.status_code == 200 and rid in page.text and "demo/echo" in page.text and "<svg" in page.text
    assert secret_prompt not in page.text
    today = datetime.now(UTC).date().isoformat()
    got = client.get(f"/dashboard/usage.csv?from={today}&to={today}")
    assert got.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(got.text)))
    assert rows == [{"day": today, "model": "demo/echo", "requests": "1", "prompt_tokens": str(row["prompt_tokens"]),
                     "completion_tokens": str(row["completion_tokens"]),
                     "cost_usd": f"{row['cost_micros'] / 1_000_000:.6f}"}]
    assert client.get("/dashboard/usage?from=2026-13-01").status_code == 200  # a bad date is explained, not a 500


def test_security_txt_follows_rfc_9116(gw: Gateway, pages: Callable[[], PageClient]) -> None:
    r = pages().get("/.well-known/security.txt")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fields = dict(line.split(": ", 1) for line in r.text.strip().splitlines())
    assert fields["Contact"] == "mailto:security@example.org" and fields["Policy"] == "https://example.org/policy"
    expires = datetime.strptime(fields["Expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert 29 <= (expires - datetime.now(UTC)).days <= 30


def test_oversized_or_unsized_forms_are_refused_before_parsing(gw: Gateway, pages: Callable[[], PageClient]) -> None:
    client = signed_in(gw, pages)
    csrf = client.csrf()
    big = client.post("/dashboard/keys", {"csrf": csrf, "name": "x" * 70_000})
    assert big.status_code == 413 and big.headers["x-content-type-options"] == "nosniff"

    def chunks() -> Iterator[bytes]:
        yield f"csrf={csrf}&name=streamed".encode()

    unsized = client.request("POST", "/dashboard/keys", content=chunks(),
                             headers={"content-type": "application/x-www-form-urlencoded"})
    assert unsized.status_code == 411
    assert [k["name"] for k in gw.run(lambda svc: svc.keys.list(gw.tenant_id))] == ["test"]


def test_embedded_session_secret_is_a_0600_file_next_to_the_database(gw: Gateway) -> None:
    from pathlib import Path

    from tollway.store.db import sqlite_path

    db = sqlite_path(gw.cfg.database.url, Path(gw.cfg.source).parent)
    assert db is not None and "TOLLWAY_SESSION_SECRET" not in os.environ
    secret = db.parent / ".tollway-session-secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes().strip()) >= 32
