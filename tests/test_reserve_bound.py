"""The reservation is an upper bound on what a request can cost: the output bound reserved
is the one the provider receives, fields and headers that change the price are refused
before anything is held, a key's spend limit caps the final charge too, and concurrent
requests cannot make a tenant consume more than its balance (docs/proxy.md, Money)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import ServerThread
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.greedy_upstream import FakeGreedy
from tests.fakes.harness import ANTHROPIC_KEY, PRICES, PROVIDER_KEY, Gateway, fake_models
from tests.test_ledger import committed, svc, usage  # noqa: F401 - the ways a ledger holds money
from tollway.config import Config, ConfigError
from tollway.errors import BadRequest, SpendLimitExceeded
from tollway.money import Prices, Usage, cost, parse_usd
from tollway.providers.base import CHAT, MESSAGES
from tollway.proxy import priced
from tollway.services import Services
from tollway.store.schema import key_spend, ledger_entries

BOUND = 4096  # models[].max_output_tokens left at its default
PRICED = Prices(Decimal("2.50"), Decimal("10.00"), Decimal("1.25"), Decimal("12.00"))
MSG = [{"role": "user", "content": "Tell me everything"}]
CLAUDE = {"input_usd_per_mtok": "3.00", "output_usd_per_mtok": "15.00"}


def models(**vision: Any) -> list[dict[str, Any]]:
    out = fake_models()
    out += [{"id": f"acme/{n}", "provider": "fake", "upstream": f"fake-{n}", **PRICES} for n in ("greedy", "liar")]
    out.append({"id": "acme/vision", "provider": "fake", "upstream": "fake-chat", **PRICES, **vision})
    out.append({"id": "anthropic/sonnet", "provider": "claude", "upstream": "fake-claude-sonnet", **CLAUDE})
    return out


@pytest.fixture
def fake() -> FakeGreedy:
    return FakeGreedy(PROVIDER_KEY)


@pytest.fixture
def claude() -> FakeAnthropic:
    return FakeAnthropic(ANTHROPIC_KEY)


@pytest.fixture
def start(launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread], fake: FakeGreedy,
          claude: FakeAnthropic) -> Callable[..., Gateway]:
    def go(**kw: Any) -> Gateway:
        kw.setdefault("models", models())
        return launch(serve_app(fake.app).url, anthropic_url=serve_app(claude.app).url, **kw)
    return go


@pytest.fixture
def gw(start: Callable[..., Gateway]) -> Gateway:
    return start()


@pytest.fixture
def gw_both(start: Callable[..., Gateway], backend: dict[str, Any]) -> Gateway:
    return start(**backend)


def post(gw: Gateway, path: str, body: dict[str, Any], key: str | None = None, **headers: str) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, timeout=30,
                      headers={"authorization": f"Bearer {key or gw.key}", **headers})


# --- the output bound reaches the provider ------------------------------------------------------


def test_upstream_receives_the_reserved_bound_when_the_client_sent_none(gw: Gateway, fake: FakeGreedy) -> None:
    assert post(gw, "/v1/chat/completions", {"model": "acme/chat", "messages": MSG}).status_code == 200
    sent = fake.requests[-1].body
    assert sent["max_tokens"] == BOUND and "max_completion_tokens" not in sent
    stream = post(gw, "/v1/chat/completions", {"model": "acme/chat", "messages": MSG, "stream": True})
    assert stream.status_code == 200 and fake.requests[-1].body["max_tokens"] == BOUND
    assert post(gw, "/v1/completions", {"model": "acme/chat", "prompt": "Once"}).status_code == 200
    assert fake.requests[-1].body["max_tokens"] == BOUND


def test_a_provider_can_take_the_bound_as_max_completion_tokens(start: Callable[..., Gateway],
                                                                 fake: FakeGreedy) -> None:
    gw = start(fake_provider={"max_tokens_field": "max_completion_tokens"})
    assert post(gw, "/v1/chat/completions", {"model": "acme/chat", "messages": MSG}).status_code == 200
    sent = fake.requests[-1].body
    assert sent["max_completion_tokens"] == BOUND and "max_tokens" not in sent
    # Legacy completions only know max_tokens.
    assert post(gw, "/v1/completions", {"model": "acme/chat", "prompt": "Once"}).status_code == 200
    assert fake.requests[-1].body["max_tokens"] == BOUND


def test_a_client_bound_above_the_models_is_lowered_to_it(gw: Gateway, fake: FakeGreedy,
                                                           claude: FakeAnthropic) -> None:
    body = {"model": "acme/chat", "messages": MSG, "max_tokens": 100_000, "max_completion_tokens": 90_000}
    assert post(gw, "/v1/chat/completions", body).status_code == 200
    sent = fake.requests[-1].body
    assert (sent["max_tokens"], sent["max_completion_tokens"]) == (BOUND, BOUND)
    assert post(gw, "/v1/chat/completions", {**body, "max_tokens": 7, "max_completion_tokens": 9}).status_code == 200
    sent = fake.requests[-1].body  # the smaller of two: the provider may read either
    assert (sent["max_tokens"], sent["max_completion_tokens"]) == (7, 7)
    r = post(gw, "/v1/messages", {"model": "anthropic/sonnet", "messages": MSG, "max_tokens": 1_000_000},
             **{"x-api-key": gw.key})
    assert r.status_code == 200, r.text
    assert claude.requests[-1][1]["max_tokens"] == BOUND


def test_n_choices_are_reserved_and_bounded_each(gw: Gateway, fake: FakeGreedy) -> None:
    before = gw.balance()
    r = post(gw, "/v1/chat/completions", {"model": "acme/greedy", "messages": MSG, "n": 3})
    assert r.status_code == 200, r.text
    assert fake.requests[-1].body["max_tokens"] == BOUND
    charged = parse_usd(r.headers["x-tollway-cost-usd"])
    assert charged == cost(Usage(20, 3 * BOUND), PRICED) and gw.balance() == before - charged


# --- what changes the price is refused before anything is held -----------------------------------

OPENAI_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"service_tier": "priority"}, "service_tier"),
    ({"service_tier": "scale"}, "service_tier"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "web_search"}]}, "tools[1].type"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"models": ["openai/o1-pro"]}, "models"),
    ({"plugins": [{"id": "web"}]}, "plugins"),
    ({"provider": {"order": ["expensive"]}}, "provider"),
    ({"search_parameters": {"mode": "on"}}, "search_parameters"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {
        "type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, "messages[0].content[1]"),
]
ANTHROPIC_REFUSED: list[tuple[dict[str, Any], dict[str, str], str]] = [
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}},
                {"type": "web_search_20250305", "name": "web_search"}]}, {}, "tools[1].type"),
    ({"tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]}, {}, "tools[0].type"),
    ({"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]}, {}, "tools[0].type"),
    ({"mcp_servers": [{"type": "url", "url": "https://example.invalid", "name": "m"}]}, {}, "mcp_servers"),
    ({"container": "container_1"}, {}, "container"),
    ({"inference_geo": "us"}, {}, "inference_geo"),
    ({"speed": "fast"}, {}, "speed"),
    ({"system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}, {},
     "system[0].cache_control.ttl"),
    ({}, {"anthropic-beta": "interleaved-thinking-2025-05-14,context-1m-2025-08-07"}, "anthropic-beta"),
    ({}, {"anthropic-beta": "extended-cache-ttl-2025-04-11"}, "anthropic-beta"),
]


def _reserve_entries(gw: Gateway) -> int:
    async def count(s: Services) -> int:
        async with s.store.read() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(ledger_entries).where(
                ledger_entries.c.tenant_id == gw.tenant_id, ledger_entries.c.kind == "reserve"))).scalar_one())
    return gw.run(count)


def test_price_changing_fields_are_refused_before_anything_is_held(gw_both: Gateway, fake: FakeGreedy,
                                                                    claude: FakeAnthropic) -> None:
    gw = gw_both
    before, forwarded, to_claude = gw.balance(), len(fake.requests), len(claude.requests)
    cases = [("/v1/chat/completions", {"model": "acme/chat", "messages": MSG, **extra}, {}, param)
             for extra, param in OPENAI_REFUSED]
    cases += [("/v1/messages", {"model": "anthropic/sonnet", "messages": MSG, "max_tokens": 64, **extra},
               headers, param) for extra, headers, param in ANTHROPIC_REFUSED]
    for path, body, headers, param in cases:
        r = post(gw, path, body, **headers)
        assert r.status_code == 400, (param, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["code"] == "unsupported_parameter", error
        assert param.split("[")[0].split(".")[0] in error["message"]
    assert len(fake.requests) == forwarded and len(claude.requests) == to_claude  # nothing forwarded
    assert gw.balance() == before and gw.held() == 0 and _reserve_entries(gw) == 0  # nothing held or charged


def test_the_same_fields_pass_where_they_cannot_raise_the_price(gw: Gateway, fake: FakeGreedy,
                                                                claude: FakeAnthropic) -> None:
    for extra in ({"service_tier": "auto"}, {"service_tier": "default"}, {"service_tier": "flex"},
                  {"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "custom", "name": "g"}]},
                  {"modalities": ["text"]}):
        r = post(gw, "/v1/chat/completions", {"model": "acme/chat", "messages": MSG, **extra})
        assert r.status_code == 200, (extra, r.text)
    anthropic_ok: list[tuple[dict[str, Any], dict[str, str]]] = [
        ({"tools": [{"name": "f", "input_schema": {"type": "object"}}, {"type": "bash_20250124", "name": "bash"}]},
         {}),
        ({"service_tier": "standard_only", "inference_geo": "global"}, {}),
        ({"system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "5m"}}]}, {}),
        ({}, {"anthropic-beta": "interleaved-thinking-2025-05-14, fine-grained-tool-streaming-2025-05-14"}),
    ]
    for extra, headers in anthropic_ok:
        r = post(gw, "/v1/messages", {"model": "anthropic/sonnet", "messages": MSG, "max_tokens": 64, **extra},
                 **headers)
        assert r.status_code == 200, (extra, r.text)
    assert dict(claude.requests[-1][0])["anthropic-beta"].startswith("interleaved-thinking")


IMAGE = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                      {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}]}]


def test_inputs_not_bounded_by_their_bytes_reserve_the_context_window(start: Callable[..., Gateway],
                                                                        fake: FakeGreedy) -> None:
    gw = start(models=models(max_input_tokens=100_000))
    r = post(gw, "/v1/chat/completions", {"model": "acme/chat", "messages": IMAGE})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[1]"
    forwarded = len(fake.requests)
    window_hold = cost(Usage(100_000, BOUND, reasoning_tokens=BOUND), PRICED)

    async def poor(s: Services) -> str:  # covers a text request, not the context window
        tid = str((await s.tenants.create("Poor"))["tenant_id"])
        await s.ledger.credit(tid, window_hold - 1, "fund")
        return str((await s.keys.create(tid))["key"])

    key = gw.run(poor)
    assert post(gw, "/v1/chat/completions", {"model": "acme/vision", "messages": IMAGE}, key).status_code == 402
    assert len(fake.requests) == forwarded
    assert post(gw, "/v1/chat/completions", {"model": "acme/vision", "messages": MSG}, key).status_code == 200
    assert post(gw, "/v1/chat/completions", {"model": "acme/vision", "messages": IMAGE}).status_code == 200


# --- the final charge and the key's spend limit ------------------------------------------------------


def _key_spent(gw: Gateway, key_id: str) -> int:
    async def read(s: Services) -> int:
        await s.ledger.flush()
        async with s.store.read() as conn:
            return int((await conn.execute(sa.select(sa.func.coalesce(sa.func.sum(key_spend.c.spent_micros), 0))
                                           .where(key_spend.c.key_id == key_id))).scalar_one())
    return gw.on_server(read)


async def test_charges_above_their_holds_share_what_the_key_limit_has_left(svc: Services) -> None:  # noqa: F811
    tid = str((await svc.tenants.create("Ada"))["tenant_id"])
    await svc.ledger.credit(tid, 100_000_000, "fund")
    key = await svc.keys.create(tid, spend_limit_micros=500_000, spend_limit_period="day")
    limit: dict[str, Any] = {"key_id": key["key_id"], "key_limit_micros": 500_000, "key_period": "2026-12-07"}
    await svc.ledger.reserve(tid, "req_a", 100_000, **limit)
    await svc.ledger.reserve(tid, "req_b", 100_000, **limit)
    assert await svc.ledger.settle("req_a", 10_000_000) == 400_000  # its hold, and what b does not hold
    assert await svc.ledger.settle("req_b", 10_000_000) == 100_000  # its hold: nothing is left
    with pytest.raises(SpendLimitExceeded):
        await svc.ledger.reserve(tid, "req_c", 1, **limit)
    await svc.ledger.flush()
    async with svc.store.read() as conn:
        spent = (await conn.execute(sa.select(key_spend.c.spent_micros))).scalar_one()
    assert spent == 500_000 and await svc.ledger.balance(tid) == 100_000_000 - 500_000
    # A key without a limit: beyond its hold a charge takes only the free balance, as before.
    await svc.ledger.reserve(tid, "req_d", 100_000)
    assert await svc.ledger.settle("req_d", 10_000_000) == 10_000_000
    assert await svc.ledger.verify(3_600_000) == []


async def test_a_late_settle_is_capped_by_the_key_limit_too(committed: Services) -> None:  # noqa: F811
    ledger = committed.ledger
    tid = str((await committed.tenants.create("Ada"))["tenant_id"])
    await ledger.credit(tid, 100_000_000, "fund")
    key = await committed.keys.create(tid, spend_limit_micros=500_000, spend_limit_period="day")
    principal = await committed.keys.authenticate(str(key["key"]))
    await ledger.reserve(tid, "req_late", 100_000, key_id=principal.key_id, key_limit_micros=500_000,
                         key_period=principal.spend_period(), worker_id="wk_dead")
    assert await ledger.release_swept(["req_late"]) == 1
    # The worker was alive after all; the provider billed far more than the hold was.
    assert await ledger.settle("req_late", 10_000_000, usage(principal.key_id)) == 500_000
    assert await ledger.balance(tid) == 100_000_000 - 500_000
    assert await ledger.verify(3_600_000) == []


def test_a_charge_above_its_hold_cannot_take_a_key_past_its_spend_limit(gw_both: Gateway) -> None:
    gw = gw_both
    limit = 100_000

    async def limited(s: Services) -> tuple[str, str]:
        key = await s.keys.create(gw.tenant_id, spend_limit_micros=limit, spend_limit_period="day")
        return str(key["key_id"]), str(key["key"])

    key_id, key = gw.run(limited)
    before = gw.balance()
    # The provider reports ten times the bound it was sent (a broken provider).
    r = post(gw, "/v1/chat/completions", {"model": "acme/liar", "messages": MSG}, key)
    assert r.status_code == 200, r.text
    charged = parse_usd(r.headers["x-tollway-cost-usd"])
    assert 0 < charged <= limit
    assert _key_spent(gw, key_id) == charged <= limit
    assert gw.balance() == before - charged
    assert gw.usage_row(r.headers["x-request-id"])["cost_micros"] == charged
    after = post(gw, "/v1/chat/completions", {"model": "acme/chat", "messages": MSG}, key)
    assert after.status_code == 429 and after.json()["error"]["code"] == "spend_limit_exceeded"
    assert gw.verify() == []


def test_concurrent_requests_cannot_consume_more_than_the_balance(gw_both: Gateway, fake: FakeGreedy) -> None:
    """Each request would generate 50,000 tokens if let (more than a whole wallet's worth);
    the wallet covers about five holds. Every answer must be charged what the provider bills
    for it, and all of them together must stay within the balance."""
    gw = gw_both
    credit = 250_000

    async def tenant(s: Services) -> tuple[str, str]:
        tid = str((await s.tenants.create("Many"))["tenant_id"])
        await s.ledger.credit(tid, credit, "fund")
        return tid, str((await s.keys.create(tid))["key"])

    tid, key = gw.run(tenant)

    async def storm() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=40, max_keepalive_connections=40)
        async with httpx.AsyncClient(base_url=gw.url, timeout=60, limits=limits) as client:
            return list(await asyncio.gather(*(client.post(
                "/v1/chat/completions", json={"model": "acme/greedy", "messages": MSG},
                headers={"authorization": f"Bearer {key}"}) for _ in range(30))))

    results = asyncio.run(storm())
    ok = [r for r in results if r.status_code == 200]
    assert ok and len(ok) + sum(r.status_code == 402 for r in results) == 30
    billed = 0
    for r in ok:
        prompt, completion = fake.billed[r.json()["id"]]
        assert completion <= BOUND
        provider_cost = cost(Usage(prompt, completion), PRICED)
        assert parse_usd(r.headers["x-tollway-cost-usd"]) == provider_cost  # no answer goes unbilled
        billed += provider_cost
    assert billed <= credit  # tolerance: none, the hold bounds each request

    async def final(s: Services) -> tuple[int, list[str]]:
        return await s.ledger.balance(tid), await s.ledger.verify(3_600_000)

    balance, problems = gw.on_server(final)
    assert balance == credit - billed and problems == []


def test_what_the_bodys_size_cannot_bound_is_found_wherever_it_is() -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://example.invalid/a.png"}}
    nested = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                            "content": [{"type": "text", "text": "x"}, image]}]}]
    assert priced.check_body(MESSAGES, {"messages": nested}).media == "messages[0].content[0].content[1]"
    text_doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "hi"}}
    assert priced.check_body(MESSAGES, {"messages": [{"role": "user", "content": [text_doc]}]}) == priced.Extra(0, None)
    assert priced.check_body(CHAT, {"messages": MSG, "functions": [{"name": "f"}]}).prompt_tokens == 1_024
    tools = [{"name": "f", "input_schema": {}}, {"type": "computer_20250124", "name": "computer"}]
    assert priced.check_body(MESSAGES, {"messages": MSG, "tools": tools}).prompt_tokens == 1_024 + 2_048
    with pytest.raises(BadRequest) as refused:
        priced.check_body(MESSAGES, {"messages": MSG, "cache_control": {"type": "ephemeral", "ttl": "1h"}})
    assert refused.value.param == "cache_control.ttl"
    with pytest.raises(BadRequest) as refused:
        priced.check_headers({"anthropic-beta": "ak_live_0123456789abcdef"})
    assert "ak_" not in refused.value.message and refused.value.param == "anthropic-beta"


@pytest.mark.parametrize("key", ["max_output_tokens", "max_input_tokens"])
def test_model_bounds_must_be_positive(make_config: Callable[..., Config], key: str) -> None:
    model = {"id": "demo/echo", "provider": "echo", "upstream": "echo-1", "input_usd_per_mtok": "1",
             "output_usd_per_mtok": "1", key: 0}
    with pytest.raises(ConfigError, match=rf"models\[0\]\.{key}: expected a positive integer"):
        make_config(models=[model])
