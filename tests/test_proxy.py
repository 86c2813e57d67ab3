"""The /v1 data plane end to end: the official openai client -> Tollway under uvicorn ->
a fake OpenAI-compatible upstream on loopback, with real wallets on both stacks."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import ServerThread
from tests.fakes.harness import PROVIDER_KEY, Gateway
from tests.fakes.openai_upstream import CACHED_TOKENS, PROMPT_TOKENS, REASONING_TOKENS, REPLY_WORDS, FakeOpenAI
from tollway.money import Prices, Usage, cost, format_usd

PRICES = Prices(Decimal("2.50"), Decimal("10.00"), Decimal("1.25"), Decimal("12.00"))


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI(PROVIDER_KEY)


@pytest.fixture
def gw(launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread], fake: FakeOpenAI) -> Gateway:
    return launch(serve_app(fake.app).url)


@pytest.fixture
def gw_both(launch: Callable[..., Gateway], serve_app: Callable[[Any], ServerThread], fake: FakeOpenAI,
            backend: dict[str, Any]) -> Gateway:
    return launch(serve_app(fake.app).url, **backend)


def expected_charge(completion: int) -> int:
    return cost(Usage(PROMPT_TOKENS, completion, cached_tokens=CACHED_TOKENS,
                      reasoning_tokens=min(REASONING_TOKENS, completion)), PRICES)


def test_chat_non_streaming_bills_usage_and_restores_slug(gw_both: Gateway, fake: FakeOpenAI) -> None:
    gw = gw_both
    before = gw.balance()
    raw = gw.client().chat.completions.with_raw_response.create(
        model="acme/chat", messages=[{"role": "user", "content": "Hi there"}],
        extra_body={"tollway_unknown_field": {"nested": [1, 2]}})
    completion = raw.parse()
    assert completion.model == "acme/chat"
    assert completion.choices[0].message.content == "".join(REPLY_WORDS)
    assert completion.usage is not None and completion.usage.prompt_tokens == PROMPT_TOKENS
    charge = expected_charge(len(REPLY_WORDS))
    assert raw.headers["x-tollway-cost-usd"] == format_usd(charge)
    rid = raw.headers["x-request-id"]
    assert rid.startswith("req_")
    assert gw.balance() == before - charge
    row = gw.usage_row(rid)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"], row["reasoning_tokens"]) == (
        PROMPT_TOKENS, len(REPLY_WORDS), CACHED_TOKENS, REASONING_TOKENS)
    assert row["cost_micros"] == charge and row["estimated"] is False and row["model"] == "acme/chat"
    sent = fake.requests[-1].body
    assert sent["model"] == "fake-chat" and sent["tollway_unknown_field"] == {"nested": [1, 2]}
    assert "stream_options" not in sent
    assert gw.verify() == []


def _sse_events(resp: httpx.Response) -> list[bytes]:
    return [e for e in resp.content.split(b"\n\n") if e.strip()]


def test_stream_with_usage_charges_exactly_the_reported_usage(gw_both: Gateway, fake: FakeOpenAI) -> None:
    gw = gw_both
    before = gw.balance()
    stream = gw.client().chat.completions.with_raw_response.create(
        model="acme/chat", messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True})
    rid = stream.headers["x-request-id"]
    chunks = list(stream.parse())
    assert all(c.model == "acme/chat" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(REPLY_WORDS)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len(REPLY_WORDS) and chunks[-1].choices == []
    charge = expected_charge(len(REPLY_WORDS))
    assert gw.balance() == before - charge
    row = gw.usage_row(rid)
    assert row["cost_micros"] == charge and row["estimated"] is False and row["completion_tokens"] == 6
    assert fake.requests[-1].body["stream_options"] == {"include_usage": True}
    assert gw.open_reservations() == 0 and gw.verify() == []


def test_stream_without_include_usage_still_meters_and_drops_only_the_usage_chunk(gw: Gateway,
                                                                                   fake: FakeOpenAI) -> None:
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                      json={"model": "acme/chat", "stream": True, "messages": [{"role": "user", "content": "x"}],
                            "stream_options": {"include_obfuscation": False}}, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        assert "set-cookie" not in resp.headers and "openai-organization" not in resp.headers
        rid = resp.headers["x-request-id"]
        resp.read()
    events = _sse_events(resp)
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    assert all("usage" not in c for c in chunks), "the client did not ask for usage"
    assert len(chunks) == len(REPLY_WORDS) + 1 and all(c["choices"] for c in chunks)
    assert all(c["model"] == "acme/chat" for c in chunks)
    # Upstream was asked for usage anyway; the client's other stream options passed through.
    assert fake.requests[-1].body["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert gw.usage_row(rid)["cost_micros"] == expected_charge(len(REPLY_WORDS))


def test_a_stream_that_arrives_in_one_read_is_charged_before_the_client_sees_its_end(gw: Gateway) -> None:
    """Events that come in the same upstream read as [DONE] go out together with it,
    after the settle: a client that saw [DONE] can already see its charge."""
    before = gw.balance()
    seen_done_at_balance = None
    received: list[bytes] = []
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                      json={"model": "acme/onewrite", "stream": True, "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": "x"}]}, timeout=30) as resp:
        rid = resp.headers["x-request-id"]
        for line in resp.iter_lines():
            if line.startswith("data: "):
                received.append(line.encode())
                if line == "data: [DONE]":
                    seen_done_at_balance = gw.balance()
    chunks = [orjson.loads(e[6:]) for e in received[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "".join(
        REPLY_WORDS)
    assert chunks[-1]["usage"]["completion_tokens"] == len(REPLY_WORDS) and all(
        c["model"] == "acme/onewrite" for c in chunks)
    assert seen_done_at_balance == before - expected_charge(len(REPLY_WORDS))
    assert gw.usage_row(rid)["estimated"] is False and gw.open_reservations() == 0


def test_usage_on_a_chunk_with_choices_keeps_the_choices(gw: Gateway) -> None:
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                      json={"model": "acme/usage-on-choice", "stream": True,
                            "messages": [{"role": "user", "content": "x"}]}, timeout=30) as resp:
        rid = resp.headers["x-request-id"]
        resp.read()
    chunks = [orjson.loads(e[6:]) for e in _sse_events(resp)[:-1]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "".join(REPLY_WORDS)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and "usage" not in chunks[-1]
    row = gw.usage_row(rid)
    assert row["cost_micros"] == expected_charge(len(REPLY_WORDS)) and row["estimated"] is False


def test_groq_style_usage_is_read_from_x_groq(gw: Gateway) -> None:
    stream = gw.client().chat.completions.with_raw_response.create(
        model="acme/groq", messages=[{"role": "user", "content": "x"}], stream=True)
    list(stream.parse())
    row = gw.usage_row(stream.headers["x-request-id"])
    assert row["cost_micros"] == expected_charge(len(REPLY_WORDS)) and row["estimated"] is False


def test_stream_without_any_usage_bills_a_flagged_estimate(gw: Gateway) -> None:
    prompt = "count these bytes please"
    stream = gw.client().chat.completions.with_raw_response.create(
        model="acme/nousage", messages=[{"role": "user", "content": prompt}], stream=True)
    list(stream.parse())
    row = gw.usage_row(stream.headers["x-request-id"])
    # The documented estimate: text bytes / 4 rounded up (+4 per message); the role counts as text.
    prompt_tokens = -(-len(prompt + "user") // 4) + 4
    completion_tokens = -(-len("".join(REPLY_WORDS)) // 4)
    assert row["estimated"] is True
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt_tokens, completion_tokens) == (11, 8)
    assert row["cost_micros"] == cost(Usage(11, 8), PRICES) and row["status"] == 200
    assert gw.verify() == []


def test_non_streaming_without_usage_bills_an_estimate_from_the_answer(gw: Gateway) -> None:
    raw = gw.client().chat.completions.with_raw_response.create(
        model="acme/nousage", messages=[{"role": "user", "content": "abcdefgh"}])
    row = gw.usage_row(raw.headers["x-request-id"])
    assert row["estimated"] is True and (row["prompt_tokens"], row["completion_tokens"]) == (3 + 4, 8)
    assert raw.headers["x-tollway-cost-usd"] == format_usd(row["cost_micros"])


def test_embeddings_float_and_base64(gw: Gateway, fake: FakeOpenAI) -> None:
    client = gw.client()
    raw = client.embeddings.with_raw_response.create(model="acme/embed", input=["a", "b"])  # SDK asks base64
    result = raw.parse()
    assert result.model == "acme/embed" and len(result.data) == 2
    assert result.data[0].embedding == pytest.approx([0.25, -0.5, 0.125])
    assert fake.requests[-1].body["encoding_format"] == "base64"
    assert raw.headers["x-tollway-cost-usd"] == format_usd(1)  # 8 tokens x $0.10/M rounds up to 1 micro-USD
    floats = client.embeddings.create(model="acme/embed", input="a", encoding_format="float")
    assert floats.data[0].embedding == [0.25, -0.5, 0.125]
    assert gw.usage_row(raw.headers["x-request-id"])["prompt_tokens"] == 8


def test_models_list_and_retrieve(gw: Gateway) -> None:
    client = gw.client()
    ids = [m.id for m in client.models.list()]
    assert "acme/chat" in ids and "acme/embed" in ids and "demo/echo" in ids
    one = client.models.retrieve("acme/chat")
    assert one.id == "acme/chat" and one.owned_by == "fake"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("acme/nope")


def test_legacy_completions_streaming_and_not(gw: Gateway, fake: FakeOpenAI) -> None:
    client = gw.client()
    done = client.completions.create(model="acme/chat", prompt="Say hi", max_tokens=20)
    assert done.model == "acme/chat" and done.choices[0].text == "".join(REPLY_WORDS)
    assert fake.requests[-1].path == "/v1/completions"
    stream = client.completions.with_raw_response.create(model="acme/chat", prompt="Say hi", stream=True)
    text = "".join(c.choices[0].text for c in stream.parse() if c.choices)
    assert text == "".join(REPLY_WORDS)
    assert gw.usage_row(stream.headers["x-request-id"])["cost_micros"] == expected_charge(len(REPLY_WORDS))


def test_key_custody_and_attribution_upstream(gw: Gateway, fake: FakeOpenAI) -> None:
    secret_prompt = "my secret prompt text"
    client = gw.client(default_headers={"openai-organization": "org-customer", "cookie": "sid=customer",
                                        "x-forwarded-for": "10.0.0.1"})
    client.chat.completions.create(model="acme/chat", messages=[{"role": "user", "content": secret_prompt}])
    stream = client.chat.completions.create(model="acme/chat", messages=[{"role": "user", "content": secret_prompt}],
                                            stream=True)
    list(stream)
    assert len(fake.requests) == 2
    for rec in fake.requests:
        headers = dict(rec.headers)
        everything = repr(rec.headers) + rec.raw.decode()
        assert "ak_" not in everything and gw.key not in everything
        assert headers["authorization"] == f"Bearer {PROVIDER_KEY}"
        assert headers["user-agent"].startswith("tollway/")
        assert headers["cf-aig-collect-log-payload"] == "false"
        assert headers["x-extra"] == "configured"
        for dropped in ("openai-organization", "cookie", "x-forwarded-for", "x-stainless-lang",
                        "x-stainless-retry-count", "x-api-key"):
            assert dropped not in headers, dropped
        meta = orjson.loads(headers["cf-aig-metadata"])
        assert meta == {"tenant_id": gw.tenant_id, "key_id": gw.key_id, "request_id": meta["request_id"]}
        assert len(meta) <= 5 and all(isinstance(v, str | int | float | bool) for v in meta.values())
        assert secret_prompt not in headers["cf-aig-metadata"]


def test_cloudflare_authenticated_gateway_token(launch: Callable[..., Gateway],
                                               serve_app: Callable[[Any], ServerThread], fake: FakeOpenAI,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    token = "cfut_Gq7Rk2Wp9Xm4Ty6Bn1Vc8Hd3"
    monkeypatch.setenv("CF_AIG_TOKEN", token)
    gw = launch(serve_app(fake.app).url, fake_provider={"cf_aig_token_env": "CF_AIG_TOKEN",
                                                        "cf_collect_log_payload": True})
    gw.client().chat.completions.create(model="acme/chat", messages=[{"role": "user", "content": "x"}])
    headers = dict(fake.requests[-1].headers)
    assert headers["cf-aig-authorization"] == f"Bearer {token}" and "cf-aig-collect-log-payload" not in headers
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                   json={"model": "acme/400", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "gateway Bearer [redacted]" in r.text  # the fake echoed it; scrubbed
    assert not any(token[i:i + 8] in r.text for i in range(len(token) - 7))


def test_no_attribution_header_unless_configured(launch: Callable[..., Gateway],
                                                 serve_app: Callable[[Any], ServerThread], fake: FakeOpenAI) -> None:
    gw = launch(serve_app(fake.app).url, attribution=None)
    gw.client().chat.completions.create(model="acme/chat", messages=[{"role": "user", "content": "x"}])
    assert not any(k.startswith("cf-aig-metadata") for k, _ in fake.requests[-1].headers)


def test_upstream_response_headers_are_allow_listed(gw: Gateway) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                   json={"model": "acme/chat", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    for hidden in ("set-cookie", "openai-organization", "openai-project", "x-ratelimit-limit-requests"):
        assert hidden not in r.headers
    assert r.json()["unknown_upstream_field"] == {"kept": True}


@pytest.mark.parametrize(("model", "status", "code"), [
    ("acme/400", 400, "fake_400"),
    ("acme/401", 502, "upstream_auth_failed"),
    ("acme/429", 429, "upstream_rate_limited"),
    ("acme/500", 502, "upstream_error"),
    ("acme/503", 502, "upstream_error"),
])
def test_upstream_errors_are_mapped_and_never_leak_the_provider_key(gw: Gateway, model: str, status: int,
                                                                      code: str) -> None:
    before = gw.balance()
    for stream in (False, True):
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                       json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == status
        err = r.json()["error"]
        assert err["code"] == code and err["message"]
        text = r.text + repr(r.headers)
        assert PROVIDER_KEY not in text
        assert not any(PROVIDER_KEY[i:i + 8] in text for i in range(len(PROVIDER_KEY) - 7)), text
        assert "set-cookie" not in r.headers and "x-ratelimit-remaining-requests" not in r.headers
        if status == 429:
            assert r.headers["retry-after"] == "7"
        row = gw.usage_row(r.headers["x-request-id"])
        assert row["cost_micros"] == 0 and row["status"] == status
    assert gw.balance() == before and gw.open_reservations() == 0 and gw.verify() == []


def test_sdk_sees_mapped_errors(gw: Gateway) -> None:
    client = gw.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="acme/400", messages=[{"role": "user", "content": "x"}])
    assert "Incorrect API key provided" in bad.value.message and PROVIDER_KEY not in bad.value.message
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="acme/429", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="acme/500", messages=[{"role": "user", "content": "x"}])


def test_echo_provider_works_offline_streaming_and_not(gw: Gateway) -> None:
    client = gw.client()
    done = client.chat.completions.with_raw_response.create(
        model="demo/echo", messages=[{"role": "user", "content": "repeat after me"}])
    parsed = done.parse()
    assert parsed.choices[0].message.content == "repeat after me" and parsed.model == "demo/echo"
    assert parsed.usage is not None and parsed.usage.completion_tokens == 4
    assert done.headers["x-tollway-cost-usd"] != "0.000000"
    chunks = list(client.chat.completions.create(model="demo/echo", stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "one two three"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    assert chunks[-1].usage is not None and all(c.model == "demo/echo" for c in chunks)
    assert gw.verify() == []


def test_customer_key_in_x_api_key_is_accepted(gw: Gateway) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": gw.key},
                   json={"model": "demo/echo", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi"


def test_base64_vectors_from_the_echo_provider(gw: Gateway) -> None:
    out = gw.client().embeddings.create(model="acme/embed", input="a", encoding_format="base64")
    # The SDK hands back the base64 string untouched when the caller asked for it.
    assert isinstance(out.data[0].embedding, str)
    assert struct.unpack("<3f", base64.b64decode(out.data[0].embedding)) == (0.25, -0.5, 0.125)
