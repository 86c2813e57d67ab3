"""The dashboard end to end in headless Chromium (Debian's package, driven by Playwright).

A customer signs in through a fake OIDC provider on loopback, tops up through Stripe
Checkout (a fake Stripe API; the signed webhook is delivered by the test, as Stripe would),
creates a key, calls the gateway with the `openai` client, sees the request in usage,
revokes the key (the next call is a 401), downloads the CSV and the export, and deletes
the account (its other key is refused at once). Each page is screenshot at 1280 px and at
360 px; TOLLWAY_SCREENSHOT_DIR=docs/screenshots writes the README's pictures.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import REQUIRE_SERVICES, ServerThread, free_port
from tests.fakes.oidc_provider import CLIENT_ID, CLIENT_SECRET, FakeOIDC
from tests.fakes.stripe_api import FakeStripe
from tests.test_stripe import SK, WHSEC, event, session, sign
from tollway.app import create_app
from tollway.config import Config

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WIDTHS = {"": 1280, "-narrow": 360}


def need_browser() -> None:
    missing = None
    if not os.access(CHROMIUM, os.X_OK):
        missing = f"{CHROMIUM} is not installed (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the playwright package is not installed (pip install -e '.[dev]')"
    if missing:
        if REQUIRE_SERVICES:
            pytest.fail(missing + "; TOLLWAY_REQUIRE_SERVICES=1 forbids skipping")
        pytest.skip(missing)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = Path(os.environ.get("TOLLWAY_SCREENSHOT_DIR") or tmp_path / "screenshots")
    target.mkdir(parents=True, exist_ok=True)
    return target


@pytest.fixture
def stack(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
          monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Config, FakeOIDC, FakeStripe]]:
    need_browser()
    monkeypatch.setenv("TOLLWAY_OIDC_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("STRIPE_SECRET_KEY", SK)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", WHSEC)
    oidc = FakeOIDC()
    oidc.issuer = serve_app(oidc.app()).url
    stripe_fake = FakeStripe(api_key=SK)
    stripe_url = serve_app(stripe_fake.app()).url
    port = free_port()  # the public URL must be known before the app is built (the OIDC redirect URI)
    url = f"http://127.0.0.1:{port}"
    cfg = make_config(dashboard={"public_url": url, "oidc_issuer": oidc.issuer, "oidc_client_id": CLIENT_ID},
                      security={"contact": "mailto:security@example.org"},
                      stripe={"api_base": stripe_url, "success_url": url + "/dashboard/wallet?paid=1",
                              "cancel_url": url + "/dashboard/wallet"})
    server = ServerThread(create_app(cfg, provider_keys={}, migrate=True), port=port).start()
    try:
        yield url, cfg, oidc, stripe_fake
    finally:
        server.stop()


def test_customer_journey_in_chromium(stack: tuple[str, Config, FakeOIDC, FakeStripe], shots: Path,
                                      tmp_path: Path) -> None:
    from playwright.sync_api import Page, expect, sync_playwright

    url, _cfg, _oidc, stripe_fake = stack

    def shoot(page: Page, name: str) -> None:
        for suffix, width in WIDTHS.items():
            page.set_viewport_size({"width": width, "height": 900})
            page.screenshot(path=str(shots / f"{name}{suffix}.png"), full_page=True)
        page.set_viewport_size({"width": 1280, "height": 900})

    def call(key: str) -> str:
        with openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30) as client:
            raw = client.chat.completions.with_raw_response.create(
                model="demo/echo", messages=[{"role": "user", "content": "Hello from the browser test"}])
            return raw.headers["x-request-id"]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        # Stripe's hosted page is not reachable here: answer for it, as a customer would see it.
        page.route("https://checkout.stripe.com/**", lambda route: route.fulfill(
            status=200, content_type="text/html", body="<h1>Stripe Checkout (test stand-in)</h1>"))

        # Sign in through the identity provider.
        page.goto(url + "/dashboard/keys")
        expect(page).to_have_url(re.compile(r"/dashboard/signin$"))
        shoot(page, "signin")
        page.get_by_role("link", name="Continue to sign in").click()
        expect(page).to_have_url(re.compile(r"/dashboard/keys$"))
        expect(page.get_by_role("heading", name="API keys")).to_be_visible()
        expect(page.get_by_text("ada@example.org")).to_be_visible()

        # Top up through Stripe Checkout; the return page credits nothing, the webhook does.
        page.get_by_role("link", name="Wallet", exact=True).click()
        expect(page.locator(".card .big").first).to_have_text("$0.00")
        page.get_by_label("Amount (USD)").fill("20.00")
        shoot(page, "wallet-empty")
        page.get_by_role("button", name="Continue to payment").click()
        expect(page.get_by_role("heading", name="Stripe Checkout (test stand-in)")).to_be_visible()
        (session_id, created), = stripe_fake.sessions.items()
        assert created["amount_total"] == 2000
        page.goto(url + "/dashboard/wallet?paid=1")
        expect(page.get_by_text("Payment pending until Stripe confirms")).to_be_visible()
        expect(page.locator(".card .big").first).to_have_text("$0.00")
        tenant_id = created["metadata"]["tollway_tenant_id"]
        payload = event("checkout.session.completed", session(session_id, tenant_id, 2000))
        r = httpx.post(url + "/webhooks/stripe", content=payload,
                       headers={"stripe-signature": sign(payload), "content-type": "application/json"})
        assert r.status_code == 200 and r.json()["outcome"].startswith("credited"), r.text
        page.goto(url + "/dashboard/wallet")
        expect(page.locator(".card .big").first).to_have_text("$20.00")

        # Create a key, see it once, call the gateway with it.
        page.get_by_role("link", name="API keys", exact=True).click()
        page.get_by_label("Name").fill("production server")
        page.get_by_role("button", name="Create key").click()
        expect(page.get_by_text("you will not see it again")).to_be_visible()
        expect(page.get_by_role("button", name="Copy")).to_be_visible()  # the script runs under the CSP
        key = page.locator("#new-key").input_value()
        assert key.startswith("ak_")
        shoot(page, "key-created")
        request_id = call(key)

        # Hold the key to fewer requests a minute on its own page (no script needed).
        page.get_by_role("link", name="Limits… of production server").click()
        page.get_by_label("Requests per minute").fill("1000")
        shoot(page, "key-limits")
        page.get_by_role("button", name="Save limits").click()
        expect(page.get_by_text("rate limits are saved")).to_be_visible()
        expect(page.get_by_role("cell", name="1,000 requests/min")).to_be_visible()

        # The request appears in usage (metadata only).
        page.get_by_role("link", name="Usage", exact=True).click()
        expect(page.get_by_text(request_id)).to_be_visible()
        assert "Hello from the browser test" not in page.content()
        shoot(page, "usage")
        with page.expect_download() as got:
            page.get_by_role("link", name="Download CSV").click()
        rows = list(csv.DictReader(Path(got.value.path()).read_text(encoding="utf-8").splitlines()))
        assert [(r["model"], r["requests"]) for r in rows] == [("demo/echo", "1")]

        # Revoke with a confirmation step; the next call is a 401.
        page.get_by_role("link", name="API keys", exact=True).click()
        page.get_by_role("link", name="Revoke…").click()
        expect(page.get_by_role("heading", name="Revoke “production server”?")).to_be_visible()
        shoot(page, "revoke")
        page.get_by_role("button", name="Revoke production server").click()
        expect(page.get_by_text("The key is revoked")).to_be_visible()
        with pytest.raises(openai.AuthenticationError):
            call(key)
        page.get_by_label("Name").fill("laptop")
        page.get_by_role("button", name="Create key").click()
        second = page.locator("#new-key").input_value()
        page.get_by_role("link", name="API keys", exact=True).click()
        shoot(page, "keys")
        call(second)
        page.get_by_role("link", name="Wallet", exact=True).click()
        expect(page.get_by_role("cell", name="topup")).to_be_visible()
        shoot(page, "wallet")

        # Download my data, then delete the account: the remaining key is refused at once.
        page.get_by_role("link", name="Privacy", exact=True).click()
        with page.expect_download() as got:
            page.get_by_role("link", name="Download my data").click()
        export = json.loads(Path(got.value.path()).read_text(encoding="utf-8"))
        assert export["format"] == "tollway-tenant-export/1" and export["profile"]["id"] == tenant_id
        assert len(export["keys"]) == 2 and all("key_hash" not in k for k in export["keys"])
        shoot(page, "privacy")
        page.get_by_label("To confirm, type").fill("not the email")
        page.get_by_role("button", name="Delete my account").click()
        expect(page.get_by_text("Type ada@example.org exactly")).to_be_visible()
        call(second)  # a refused confirmation changed nothing
        page.get_by_label("To confirm, type").fill("ada@example.org")
        page.get_by_role("button", name="Delete my account").click()
        expect(page.get_by_role("heading", name="Your account has been deleted")).to_be_visible()
        with pytest.raises(openai.AuthenticationError):
            call(second)
        page.goto(url + "/dashboard/keys")
        expect(page).to_have_url(re.compile(r"/dashboard/signin$"))

        page.goto(url + "/security")
        expect(page.get_by_role("heading", name="Security and privacy")).to_be_visible()
        shoot(page, "security")
        context.close()
        browser.close()
