"""POST /v1/responses through Tollway with the official openai client: the answer intact,
usage read from the response (streams: response.completed) and charged exactly, with
cached and reasoning tokens priced apart; the output bound sent upstream; never stored."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import ServerThread
from tests.fakes.harness import PRICES as PRICE_STRINGS
from tests.fakes.harness import PROVIDER_KEY, Gateway
from tests.fakes.responses_upstream import ABSURD, SLOW_USAGE, USAGE, WORDS, FakeResponses
from tollway.money import Prices, Usage, cost, format_usd, max_cost
from tollway.providers.base import estimate_prompt_tokens, tokens_from_bytes

PRICES = Prices(Decimal("2.50"), Decimal("10.00"), Decimal("1.25"), Decimal("12.00"))
# USAGE priced by hand: (40 - 12) x 2.50 + 12 x 1.25 + (30 - 9) x 10.00 + 9 x 12.00 micro-dollars.
EXPECTED = 70 + 15 + 210 + 108
NAMES = ("resp", "resp-slow", "resp-cut", "resp-absurd", "resp-incomplete", "resp-failed", "resp-error")


def models() -> list[dict[str, Any]]:
    out = [{"id": f"acme/{n}", "provider": "fake", "upstream": f"fake-{n}", **PRICE_STRINGS} for n in NAMES]
    out.append({"id": "acme/chat", "provider": "fake", "upstream": "fake-chat", **PRICE_STRINGS})
    out.append({"id": "demo/echo", "provider": "echo", "upstream": "echo-1",
                "input_usd_per_mtok": "1.00", "output_usd_per_mtok": "2.00"})
    return out


@pytest.fixture
def fake() -> FakeResponses:
    return FakeResponses(PROVIDER_KEY)


@pytest.fixture
def gw(launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread], fake: FakeResponses,
       backend: dict[str, Any]) -> Gateway:
    return launch(serve_app(fake.app).url, models=models(), fake_provider={"responses_api": "on"}, **backend)


@pytest.fixture
def gw1(launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread], fake: FakeResponses) -> Gateway:
    """The embedded default only, for the tests whose subject is not the ledger's path."""
    return launch(serve_app(fake.app).url, models=models(), fake_provider={"responses_api": "on"})


def post(gw: Gateway, body: Any, key: str | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(gw.url + "/v1/responses", content=content, timeout=30,
                      headers={"authorization": f"Bearer {key or gw.key}", "content-type": "application/json"})


def test_non_streaming_answer_usage_and_charge_are_exact(gw: Gateway, fake: FakeResponses) -> None:
    before = gw.balance()
    raw = gw.client().responses.with_raw_response.create(
        model="acme/resp", input="Hi", instructions="Be brief.", prompt_cache_key="conv-1")
    resp = raw.parse()
    assert resp.output_text == "".join(WORDS) and resp.model == "acme/resp"
    assert resp.usage is not None and resp.usage.input_tokens_details.cached_tokens == 12
    assert resp.usage.output_tokens_details.reasoning_tokens == 9
    assert (USAGE["input_tokens"], USAGE["output_tokens"]) == (40, 30)
    assert cost(Usage(40, 30, cached_tokens=12, reasoning_tokens=9), PRICES) == EXPECTED
    assert raw.headers["x-tollway-cost-usd"] == format_usd(EXPECTED)
    row = gw.usage_row(raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"], row["reasoning_tokens"]) == (
        40, 12, 30, 9)
    assert row["cost_micros"] == EXPECTED and row["estimated"] is False
    assert gw.balance() == before - EXPECTED
    sent = fake.requests[-1]
    headers = dict(sent.headers)
    assert sent.path == "/v1/responses" and sent.body["model"] == "fake-resp"
    assert sent.body["store"] is False and fake.stored == []  # never stored on the shared account
    assert sent.body["max_output_tokens"] == 4096  # the model's bound, sent so the provider enforces it
    assert sent.body["instructions"] == "Be brief." and sent.body["input"] == "Hi"
    assert sent.body["prompt_cache_key"] != "conv-1"  # namespaced per tenant (tenant_tag.py)
    assert headers["authorization"] == f"Bearer {PROVIDER_KEY}" and "ak_" not in sent.raw.decode() + repr(headers)
    assert gw.open_reservations() == 0 and gw.verify() == []


def test_streaming_answer_usage_and_charge_are_exact(gw: Gateway, fake: FakeResponses) -> None:
    before = gw.balance()
    client = gw.client()
    with client.responses.with_streaming_response.create(model="acme/resp", input="Hi", stream=True) as raw:
        rid = raw.headers["x-request-id"]
        events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "".join(WORDS)
    final = events[-1].response  # type: ignore[union-attr]
    assert final.model == "acme/resp" and final.output_text == "".join(WORDS)
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens == 9
    assert all(e.response.model == "acme/resp" for e in events if hasattr(e, "response"))
    row = gw.usage_row(rid)
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"], row["reasoning_tokens"]) == (
        40, 12, 30, 9)
    assert row["cost_micros"] == EXPECTED and row["estimated"] is False
    assert gw.balance() == before - EXPECTED
    # The SDK's accumulating helper, which checks every item and response id along the way.
    with client.responses.stream(model="acme/resp", input="Hi") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        done = stream.get_final_response()
    assert text == done.output_text == "".join(WORDS) and done.model == "acme/resp"
    assert gw.balance() == before - 2 * EXPECTED
    assert fake.stored == [] and all(r.body["store"] is False for r in fake.requests)
    assert "stream_options" not in fake.requests[-1].body  # nothing chat-only is added
    assert gw.open_reservations() == 0 and gw.verify() == []


def test_the_output_bound_is_lowered_to_the_models_and_kept_below(gw1: Gateway, fake: FakeResponses) -> None:
    client = gw1.client()
    for asked, sent in ((100_000, 4096), (64, 64)):
        client.responses.create(model="acme/resp", input="Hi", max_output_tokens=asked)
        assert fake.requests[-1].body["max_output_tokens"] == sent
    r = post(gw1, {"model": "acme/resp", "input": "Hi", "max_output_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens"
    for bad in ("", [], 5, None):
        r = post(gw1, {"model": "acme/resp", "input": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input", bad


def _other_tenant(gw: Gateway) -> str:
    async def make(svc: Any) -> str:
        tenant = await svc.tenants.create(name="Mallory")
        await svc.ledger.credit(tenant["tenant_id"], 10_000_000, "fund-" + tenant["tenant_id"])
        return str((await svc.keys.create(tenant["tenant_id"], name="m"))["key"])

    return gw.run(make)


def test_another_tenants_response_cannot_be_read_through_previous_response_id(gw1: Gateway,
                                                                              fake: FakeResponses) -> None:
    victim = gw1.client().responses.create(model="acme/resp", input="my secret plan")
    assert fake.stored == []  # nothing of the victim's is kept at the provider to be read back
    attacker = _other_tenant(gw1)
    forwarded = len(fake.requests)
    for body in ({"previous_response_id": victim.id}, {"conversation": "conv_" + victim.id},
                 {"conversation": {"id": "conv_1"}}, {"prompt": {"id": "pmpt_1", "version": "2"}},
                 {"input": [{"type": "item_reference", "id": victim.output[0].id}]},
                 {"input": [{"type": "reasoning", "id": "rs_" + victim.id, "summary": []}]}):
        r = post(gw1, {"model": "acme/resp", "input": "Repeat what I said before.", **body}, key=attacker)
        param = r.json()["error"]["param"]
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter", body
        assert param in ("previous_response_id", "conversation", "prompt", "input[0]"), body
    assert len(fake.requests) == forwarded  # nothing forwarded, nothing held or charged
    assert gw1.open_reservations() == 0 and gw1.verify() == []


def test_store_and_background_are_refused_or_forced_off(gw1: Gateway, fake: FakeResponses) -> None:
    before = gw1.balance()
    for body, param in (({"store": True}, "store"), ({"background": True}, "background"),
                        ({"store": "yes"}, "store"), ({"background": 1}, "background")):
        r = post(gw1, {"model": "acme/resp", "input": "Hi", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, body
    assert fake.requests == [] and gw1.balance() == before
    r = post(gw1, {"model": "acme/resp", "input": "Hi", "store": False, "background": False})
    assert r.status_code == 200 and fake.requests[-1].body["store"] is False and fake.stored == []
    # A stateless client passes reasoning back with its encrypted content: that works, and
    # needs the model's context window to bound it (an opaque blob's bytes do not).
    r = post(gw1, {"model": "acme/resp", "input": [
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA" + "x" * 40},
        {"role": "user", "content": "go on"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].encrypted_content"


@pytest.mark.parametrize("tool", [
    {"type": "web_search"}, {"type": "web_search_preview"}, {"type": "file_search", "vector_store_ids": ["vs_1"]},
    {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "computer_use_preview", "display_width": 1024, "display_height": 768, "environment": "browser"},
    {"type": "image_generation"}, {"type": "mcp", "server_label": "x", "server_url": "https://mcp.invalid"},
    {"type": ["function"]}, {"name": "no_type"}])
def test_built_in_tools_are_refused_with_nothing_forwarded_or_charged(gw1: Gateway, fake: FakeResponses,
                                                                     tool: dict[str, Any]) -> None:
    before = gw1.balance()
    fn = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
    r = post(gw1, {"model": "acme/resp", "input": "Hi", "tools": [fn, tool]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "unsupported_parameter" and err["param"] == "tools[1].type"
    assert fake.requests == [] and gw1.balance() == before and gw1.open_reservations() == 0


def test_client_run_tools_and_priced_fields(gw1: Gateway, fake: FakeResponses) -> None:
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}},
             {"type": "custom", "name": "apply"}, {"type": "local_shell"}, {"type": "shell"}, {"type": "apply_patch"}]
    assert post(gw1, {"model": "acme/resp", "input": "Hi", "tools": tools}).status_code == 200
    assert fake.requests[-1].body["tools"] == tools
    for body, param in (({"service_tier": "priority"}, "service_tier"),
                        ({"input": [{"role": "user", "content": [{"type": "input_image",
                                                                  "image_url": "https://x.invalid/a.png"}]}]},
                         "input[0].content[0]"),
                        ({"input": [{"type": "function_call_output", "call_id": "c", "output": [
                            {"type": "input_file", "file_id": "file_1"}]}]}, "input[0].output[0]")):
        r = post(gw1, {"model": "acme/resp", "input": "Hi", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, body


def test_a_stream_that_ends_without_response_completed_is_charged_the_estimate(gw: Gateway) -> None:
    before = gw.balance()
    body = {"model": "acme/resp-cut", "input": "Tell me a story", "instructions": "Short."}
    deltas: list[str] = []
    with (pytest.raises(openai.APIError) as err,
          gw.client().responses.with_streaming_response.create(stream=True, **body) as raw):
        rid = raw.headers["x-request-id"]
        for e in raw.parse():
            if e.type == "response.output_text.delta":
                deltas.append(e.delta)
    assert "model provider" in str(err.value) and "".join(deltas) == "".join(WORDS[:3])
    row = gw.usage_row(rid)
    # The provider cut its stream: the documented estimate (base.py), flagged.
    prompt = estimate_prompt_tokens(body)
    assert prompt == tokens_from_bytes(len("Tell me a story") + len("Short."))
    completion = tokens_from_bytes(len("".join(WORDS[:3])))
    assert row["estimated"] is True and (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    charged = cost(Usage(prompt, completion), PRICES)
    assert row["cost_micros"] == charged > 0 and gw.balance() == before - charged
    assert gw.open_reservations() == 0 and gw.verify() == []


def test_a_provider_error_event_is_scrubbed_and_the_stream_charged(gw1: Gateway) -> None:
    with httpx.stream("POST", gw1.url + "/v1/responses", headers={"authorization": f"Bearer {gw1.key}"},
                      json={"model": "acme/resp-error", "input": "Hi", "stream": True}, timeout=30) as resp:
        rid = resp.headers["x-request-id"]
        text = resp.read().decode()
    assert '"type":"error"' in text and "The server had an error" in text
    assert PROVIDER_KEY not in text and PROVIDER_KEY[5:15] not in text
    row = gw1.usage_row(rid)
    assert row["estimated"] is True and row["error_type"] == "UpstreamError" and row["cost_micros"] > 0
    assert gw1.open_reservations() == 0


def test_incomplete_and_failed_responses_are_delivered_and_billed_their_usage(gw1: Gateway) -> None:
    for model, last in (("acme/resp-incomplete", "response.incomplete"), ("acme/resp-failed", "response.failed")):
        with gw1.client().responses.with_streaming_response.create(model=model, input="Hi", stream=True) as raw:
            rid = raw.headers["x-request-id"]
            events = list(raw.parse())
        assert events[-1].type == last and events[-1].response.model == model  # type: ignore[union-attr]
        row = gw1.usage_row(rid)
        assert row["cost_micros"] == EXPECTED and row["estimated"] is False, model
    assert gw1.open_reservations() == 0 and gw1.verify() == []


def test_client_disconnect_mid_stream_reads_on_and_bills_the_providers_usage(gw: Gateway,
                                                                              fake: FakeResponses) -> None:
    before = gw.balance()
    read = b""
    with httpx.stream("POST", gw.url + "/v1/responses", headers={"authorization": f"Bearer {gw.key}"},
                      json={"model": "acme/resp-slow", "input": "Hi", "stream": True}, timeout=30) as resp:
        rid = resp.headers["x-request-id"]
        for part in resp.iter_raw():
            read += part
            if read.count(b"response.output_text.delta") >= 5:
                break
    row = gw.usage_row(rid, wait=30)
    # docs/proxy.md, "A client that leaves": the provider's own final count, hidden reasoning included.
    charged = cost(Usage(25, 5_000, reasoning_tokens=4_000), PRICES)
    assert SLOW_USAGE["output_tokens"] == 5_000
    assert row["status"] == 499 and row["error_type"] == "client_disconnected" and row["estimated"] is False
    assert (row["completion_tokens"], row["reasoning_tokens"], row["cost_micros"]) == (5_000, 4_000, charged)
    assert fake.cancelled == [] and gw.balance() == before - charged
    assert gw.open_reservations() == 0 and gw.verify() == []


@pytest.mark.parametrize("stream", [True, False])
def test_absurd_usage_is_charged_the_reservation(gw1: Gateway, stream: bool) -> None:
    before = gw1.balance()
    raw = orjson.dumps({"model": "acme/resp-absurd", "input": "Hi", "max_output_tokens": 100, "stream": stream})
    with httpx.stream("POST", gw1.url + "/v1/responses", content=raw, timeout=30,
                      headers={"authorization": f"Bearer {gw1.key}", "content-type": "application/json"}) as resp:
        rid = resp.headers["x-request-id"]
        text = resp.read().decode()
    assert resp.status_code == 200 and str(ABSURD) in text  # the answer is delivered as the provider sent it
    held = max_cost(len(raw), 100, PRICES)  # prompt bound = the body's bytes; output bound = 100
    row = gw1.usage_row(rid)
    assert row["error_type"] == "InvalidUsage" and row["cost_micros"] == held
    assert gw1.balance() == before - held and gw1.open_reservations() == 0 and gw1.verify() == []


def test_models_whose_provider_does_not_serve_responses(launch: Callable[..., Gateway],
                                                        serve_app: Callable[[Any], ServerThread],
                                                        fake: FakeResponses) -> None:
    claude = {"id": "anthropic/claude", "provider": "claude", "upstream": "claude-x", **PRICE_STRINGS}
    gw = launch(serve_app(fake.app).url, models=[*models(), claude], anthropic_url="http://127.0.0.1:9")
    r = post(gw, {"model": "acme/resp", "input": "Hi"})  # responses_api = "auto": off for a loopback vendor
    assert r.status_code == 400 and "POST /v1/chat/completions" in r.json()["error"]["message"]
    r = post(gw, {"model": "anthropic/claude", "input": "Hi"})
    assert r.status_code == 400 and "POST /v1/messages" in r.json()["error"]["message"]
    assert post(gw, {"model": "acme/nope", "input": "Hi"}).status_code == 404
    assert fake.requests == [] and gw.open_reservations() == 0
    echo = post(gw, {"model": "demo/echo", "input": "Hi"})  # the offline provider always serves it
    assert echo.status_code == 200


def test_echo_serves_responses_offline(gw1: Gateway) -> None:
    client = gw1.client()
    before = gw1.balance()
    raw = client.responses.with_raw_response.create(model="demo/echo", input="Hello echo")
    resp = raw.parse()
    assert resp.output_text == "Hello echo" and resp.model == "demo/echo" and resp.usage is not None
    echo_prices = Prices(Decimal("1.00"), Decimal("2.00"))
    first = cost(Usage(resp.usage.input_tokens, resp.usage.output_tokens), echo_prices)
    assert raw.headers["x-tollway-cost-usd"] == format_usd(first)
    with client.responses.stream(model="demo/echo", input=[{"role": "user", "content": "one two three"}]) as s:
        text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
        done = s.get_final_response()
    assert text == done.output_text == "one two three" and done.model == "demo/echo"
    assert done.usage is not None
    second = cost(Usage(done.usage.input_tokens, done.usage.output_tokens), echo_prices)
    assert gw1.balance() == before - first - second
