"""Tenants share the operator's provider account: the fields that partition the provider's
per-user state (its prompt cache above all) carry a per-tenant pseudonym, and a value a
client sent is namespaced so two tenants cannot meet in one cache bucket."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import ServerThread
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.harness import ANTHROPIC_KEY, PROVIDER_KEY, Gateway
from tests.fakes.openai_upstream import FakeOpenAI
from tollway.services import Services

CHAT = {"model": "acme/chat", "messages": [{"role": "user", "content": "Bonjour"}]}
CLIENT_SENT = {"prompt_cache_key": "shared-prefix", "safety_identifier": "end-user-1", "user": "end-user-1"}
FIELDS = ("prompt_cache_key", "safety_identifier", "user")


def second_tenant(gw: Gateway) -> tuple[str, str]:
    async def make(svc: Services) -> tuple[str, str]:
        tenant = (await svc.tenants.create(name="Bob"))["tenant_id"]
        await svc.ledger.credit(tenant, 10_000_000, "fund-" + tenant)
        return tenant, (await svc.keys.create(tenant, name="bob"))["key"]

    return gw.run(make)


def post(gw: Gateway, key: str, path: str, body: dict[str, Any], **headers: str) -> None:
    r = httpx.post(gw.url + path, json=body, headers={"authorization": f"Bearer {key}", **headers}, timeout=30)
    assert r.status_code == 200, r.text


def sent(fake: FakeOpenAI, path: str, n: int) -> list[dict[str, Any]]:
    return [r.body for r in fake.requests if r.path.endswith(path)][-n:]


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI(PROVIDER_KEY)


def test_openai_fields_carry_a_per_tenant_pseudonym(launch: Callable[..., Gateway],
                                                     serve_app: Callable[[Any], ServerThread],
                                                     fake: FakeOpenAI) -> None:
    gw = launch(serve_app(fake.app).url, fake_provider={"tenant_fields": "openai"})
    bob, bob_key = second_tenant(gw)
    for key in (gw.key, bob_key, gw.key):
        post(gw, key, "/v1/chat/completions", CHAT)
    ada1, bob1, ada2 = sent(fake, "/chat/completions", 3)
    for name in ("prompt_cache_key", "safety_identifier"):
        assert ada1[name] == ada2[name] != bob1[name]  # one bucket per tenant, none shared
        assert gw.tenant_id not in ada1[name] and bob not in bob1[name] and len(ada1[name]) <= 64
    assert "user" not in ada1  # chat: the two fields that replace it
    post(gw, gw.key, "/v1/chat/completions", {**CHAT, "prompt_cache_key": None, "safety_identifier": None})
    (opted_out,) = sent(fake, "/chat/completions", 1)
    assert opted_out["prompt_cache_key"] == ada1["prompt_cache_key"]  # a null does not leave the partition
    assert opted_out["safety_identifier"] == ada1["safety_identifier"]
    # Values a client chose: kept apart per tenant, and apart from the tenant's own tag.
    for key in (gw.key, bob_key):
        post(gw, key, "/v1/chat/completions", {**CHAT, **CLIENT_SENT})
    ada3, bob3 = sent(fake, "/chat/completions", 2)
    for name in FIELDS:
        assert ada3[name] != bob3[name] and CLIENT_SENT[name] not in (ada3[name], bob3[name])
        assert ada3[name] != ada1.get(name) and len(ada3[name]) <= 64
    assert ada3["safety_identifier"] == ada3["user"]  # the same end user stays one within a tenant
    # Embeddings and legacy completions take `user`.
    for key in (gw.key, bob_key):
        post(gw, key, "/v1/embeddings", {"model": "acme/embed", "input": "x"})
    ada4, bob4 = sent(fake, "/embeddings", 2)
    assert ada4["user"] == ada1["safety_identifier"] != bob4["user"]


def test_compatible_vendor_gets_no_new_field_by_default(launch: Callable[..., Gateway],
                                                       serve_app: Callable[[Any], ServerThread],
                                                       fake: FakeOpenAI) -> None:
    """Not every OpenAI-compatible vendor accepts these fields: unasked, only api.openai.com
    gets them; what a client sent is namespaced all the same."""
    gw = launch(serve_app(fake.app).url)
    _, bob_key = second_tenant(gw)
    post(gw, gw.key, "/v1/chat/completions", CHAT)
    assert not set(FIELDS) & set(sent(fake, "/chat/completions", 1)[0])
    for key in (gw.key, bob_key):
        post(gw, key, "/v1/chat/completions", {**CHAT, "prompt_cache_key": "shared-prefix"})
    ada, bob = sent(fake, "/chat/completions", 2)
    assert ada["prompt_cache_key"] != bob["prompt_cache_key"] and "shared-prefix" not in ada["prompt_cache_key"]


def test_anthropic_metadata_user_id_is_per_tenant(launch: Callable[..., Gateway],
                                                  serve_app: Callable[[Any], ServerThread]) -> None:
    claude = FakeAnthropic(ANTHROPIC_KEY)
    models = [{"id": "anthropic/sonnet", "provider": "claude", "upstream": "fake-claude-sonnet",
               "input_usd_per_mtok": "3.00", "output_usd_per_mtok": "15.00"}]
    gw = launch(serve_app(FakeOpenAI("unused").app).url, models=models, anthropic_url=serve_app(claude.app).url)
    bob, bob_key = second_tenant(gw)
    body = {"model": "anthropic/sonnet", "max_tokens": 16, "messages": [{"role": "user", "content": "Salut"}]}
    v = {"anthropic-version": "2023-06-01"}
    for key in (gw.key, bob_key, gw.key):
        post(gw, key, "/v1/messages", body, **v)
    for key in (gw.key, bob_key):
        post(gw, key, "/v1/messages", {**body, "metadata": {"user_id": "end-user-1"}}, **v)
    ada1, bob1, ada2, ada3, bob3 = (b["metadata"]["user_id"] for _, b in claude.requests[-5:])
    assert ada1 == ada2 != bob1 and gw.tenant_id not in ada1 and bob not in bob1
    assert ada3 != bob3 and "end-user-1" not in (ada3, bob3) and ada3 != ada1
