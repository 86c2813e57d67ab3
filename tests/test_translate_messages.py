"""The official `anthropic` client (2.x) on an OpenAI-format model: /v1/messages
translated to chat completions and back (providers/translate/to_openai.py), against a
scripted OpenAI-compatible provider on loopback. Billing is the provider's own usage
at the model's prices, to the micro-dollar."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from tests.conftest import ServerThread
from tests.fakes.harness import PROVIDER_KEY, Gateway, launcher
from tests.fakes.scripted_upstream import Reply, Scripted, charged, openai_chunk
from tollway.config import Config
from tollway.money import format_usd
from tollway.providers.base import estimate_prompt_tokens, tokens_from_bytes
from tollway.providers.translate import to_openai

PRICES = {"input_usd_per_mtok": "3.00", "output_usd_per_mtok": "15.00", "cached_input_usd_per_mtok": "0.30"}
MAX_OUTPUT = 4096
USAGE = {"prompt_tokens": 1300, "completion_tokens": 50, "total_tokens": 1350,
         "prompt_tokens_details": {"cached_tokens": 1000}}
CHARGE = 300 * 3 + 1000 * 3 // 10 + 50 * 15  # micro-dollars: 300 fresh, 1000 cached, 50 out
CREDIT = 10_000_000
USER = {"role": "user", "content": "Hello"}
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture
def upstream() -> Scripted:
    return Scripted()


MODELS = [{"id": "oa/gpt", "provider": "fake", "upstream": "gpt-up", "max_output_tokens": MAX_OUTPUT,
           "max_input_tokens": 200_000, **PRICES},
          {"id": "demo/echo", "provider": "echo", "upstream": "echo-1", "input_usd_per_mtok": "1.00",
           "output_usd_per_mtok": "2.00"}]


@pytest.fixture
def launch(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
           upstream: Scripted) -> Iterator[Callable[..., Gateway]]:
    upstream.url = serve_app(upstream.app).url
    yield from launcher(make_config, serve_app)


@pytest.fixture
def gw(launch: Callable[..., Gateway], upstream: Scripted) -> Gateway:
    # One attempt: a scripted reply is the provider's answer (retries: test_fallback.py).
    return launch(upstream.url, models=MODELS, credit_micros=CREDIT, server={"retry_attempts": 0})


def client(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)


def failed_stream(gw: Gateway) -> tuple[str, anthropic.APIError]:
    """Stream an answer that fails on the way: the request id and what the SDK raised."""
    with (client(gw) as c, pytest.raises(anthropic.APIError) as err,
          c.messages.stream(model="oa/gpt", max_tokens=64, messages=[USER]) as stream):  # type: ignore[list-item]
        rid = stream.response.headers["x-request-id"]
        for _ in stream.text_stream:
            pass
    return rid, err.value


def completion(message: dict[str, Any], finish: str = "stop", usage: dict[str, Any] | None = None) -> Reply:
    return Reply({"id": "chatcmpl-up1", "object": "chat.completion", "created": 1, "model": "gpt-up-2025",
                  "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
                  "usage": usage or USAGE})


def chunks(*deltas: dict[str, Any], finish: str = "stop", usage: bool = True, done: bool = True) -> Reply:
    events = [openai_chunk({"role": "assistant", "content": ""}), *(openai_chunk(d) for d in deltas),
              openai_chunk(finish=finish)]
    if usage:
        events.append(openai_chunk(usage=USAGE, choices=False))
    if done:
        events.append(b"data: [DONE]\n\n")
    return Reply(events=events)


def assert_charged(gw: Gateway, request_id: str) -> dict[str, Any]:
    return charged(gw, request_id, CHARGE, CREDIT)


def test_text_and_system_prompt(gw: Gateway, upstream: Scripted) -> None:
    upstream.replies.append(completion({"content": "Bonjour !"}))
    with client(gw) as c:
        raw = c.messages.with_raw_response.create(
            model="oa/gpt", max_tokens=64, system="Answer in French.", messages=[USER],  # type: ignore[list-item]
            stop_sequences=["END"], metadata={"user_id": "end-user-1"}, cache_control={"type": "ephemeral"},
            extra_body={"temperature": 0.5})  # not a parameter of the 2.x SDK any more; older clients send it
    msg = raw.parse()
    assert msg.type == "message" and msg.model == "oa/gpt" and msg.stop_reason == "end_turn"
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "Bonjour !"  # type: ignore[union-attr]
    u = msg.usage
    assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens, u.output_tokens) == (
        300, 1000, 0, 50)
    assert raw.headers["x-tollway-cost-usd"] == format_usd(CHARGE) == "0.001950"
    row = assert_charged(gw, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (1300, 1000, 50)
    path, headers, body = upstream.requests[-1]
    assert path == "/v1/chat/completions" and headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert not any(k.startswith("anthropic-") for k in headers) and "ak_" not in repr(headers)
    assert body["model"] == "gpt-up" and body["max_tokens"] == 64
    assert body["messages"] == [{"role": "system", "content": "Answer in French."},
                                {"role": "user", "content": "Hello"}]
    assert (body["temperature"], body["stop"]) == (0.5, ["END"])
    assert body["user"] != "end-user-1" and body["user"].startswith("tw_")  # the tenant's pseudonym of it


def test_a_tool_call_round_trip(gw: Gateway, upstream: Scripted) -> None:
    upstream.replies.append(completion({"content": "Let me look.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        finish="tool_calls"))
    with client(gw) as c:
        first = c.messages.create(model="oa/gpt", max_tokens=100, messages=[USER],  # type: ignore[list-item]
                                  tools=[WEATHER], tool_choice={"type": "any", "disable_parallel_tool_use": True})
        assert first.stop_reason == "tool_use" and [b.type for b in first.content] == ["text", "tool_use"]
        use = first.content[1]
        assert use.type == "tool_use" and (use.id, use.name, use.input) == ("call_1", "get_weather", {"city": "Paris"})
        sent = upstream.requests[-1][2]
        assert sent["tools"] == [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER["input_schema"]}}]
        assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False

        upstream.replies.append(completion({"content": "18 degrees in Paris."}))
        second = c.messages.create(model="oa/gpt", max_tokens=100, tools=[WEATHER], messages=[
            USER, {"role": "assistant", "content": first.content},  # type: ignore[list-item]
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                                         {"type": "text", "text": "And tomorrow?"}]}])
    assert second.content[0].text == "18 degrees in Paris."  # type: ignore[union-attr]
    assert upstream.requests[-1][2]["messages"] == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "user", "content": "And tomorrow?"}]
    assert gw.balance() == CREDIT - 2 * CHARGE and gw.open_reservations() == 0


def test_images_and_cache_markers(gw: Gateway, upstream: Scripted) -> None:
    upstream.replies.append(completion({"content": "A cat."}))
    eph = {"type": "ephemeral"}
    with client(gw) as c:
        c.messages.create(model="oa/gpt", max_tokens=10, system=[
            {"type": "text", "text": "Be brief.", "cache_control": eph}, {"type": "text", "text": "Be kind."}],
            messages=[{"role": "user", "content": [
                {"type": "text", "text": "What is this?", "cache_control": eph},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert upstream.requests[-1][2]["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]


def test_streaming_text(gw: Gateway, upstream: Scripted) -> None:
    upstream.replies.append(chunks({"content": "Bon"}, {"content": "jour"}, {"content": " !"}))
    with client(gw) as c, c.messages.stream(model="oa/gpt", max_tokens=64, system="Answer in French.",
                                            messages=[USER]) as stream:  # type: ignore[list-item]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        rid = stream.response.headers["x-request-id"]
    assert text == "Bonjour !" and final.model == "oa/gpt" and final.stop_reason == "end_turn"
    u = final.usage
    assert (u.input_tokens, u.cache_read_input_tokens, u.output_tokens) == (300, 1000, 50)
    assert_charged(gw, rid)
    sent = upstream.requests[-1][2]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_streamed_events_are_in_anthropic_order(gw: Gateway, upstream: Scripted) -> None:
    upstream.replies.append(chunks({"reasoning_content": "Hm."}, {"content": "Hi"}))
    r = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": gw.key},
                   json={"model": "oa/gpt", "max_tokens": 10, "stream": True, "messages": [USER]})
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"]
    assert "data: [DONE]" not in r.text and "chat.completion.chunk" not in r.text


def test_streamed_tool_call_arguments_split_across_many_deltas(gw: Gateway, upstream: Scripted) -> None:
    arguments = json.dumps({"city": "Paris", "unit": "celsius", "note": "caf\u00e9 \"quoted\""})
    head = {"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}]}
    pieces = [{"tool_calls": [{"index": 0, "function": {"arguments": arguments[i:i + 3]}}]}
              for i in range(0, len(arguments), 3)]
    upstream.replies.append(chunks({"content": "Checking."}, head, *pieces, finish="tool_calls"))
    with client(gw) as c, c.messages.stream(model="oa/gpt", max_tokens=64, messages=[USER],  # type: ignore[list-item]
                                            tools=[WEATHER]) as stream:  # type: ignore[list-item]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and [b.type for b in final.content] == ["text", "tool_use"]
    use = final.content[1]
    assert use.type == "tool_use" and use.id == "call_9" and use.input == json.loads(arguments)
    assert gw.balance() == CREDIT - CHARGE


@pytest.mark.parametrize(("field", "value", "param"), [
    ("top_k", 5, "top_k"),
    ("cache_control", {"type": "ephemeral", "ttl": "1h"}, "cache_control.ttl"),  # priced.py, the client's format
    ("diagnostics", {"a": 1}, "diagnostics"),
    ("thinking", {"type": "enabled", "budget_tokens": 1024}, "thinking"),
    ("output_config", {"effort": "low"}, "output_config"),
    ("tools", [{"type": "bash_20250124", "name": "bash"}], "tools[0].type"),
    ("metadata", {"user_id": "u", "team": "x"}, "metadata.team"),
    ("messages", [{"role": "user", "content": [{"type": "document", "source": {
        "type": "text", "media_type": "text/plain", "data": "x"}}]}], "messages[0].content[0]"),
    ("messages", [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}]}],
     "messages[0].content[0].content[0]"),
])
def test_an_untranslatable_field_is_refused_and_nothing_is_forwarded_or_held(
        gw: Gateway, upstream: Scripted, field: str, value: Any, param: str) -> None:
    body: dict[str, Any] = {"model": "oa/gpt", "max_tokens": 10, "messages": [USER], field: value}
    r = httpx.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": gw.key})
    assert r.status_code == 400, r.text
    data = r.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"  # Anthropic's shape
    assert data["error"]["param"] == param and param in data["error"]["message"]
    assert upstream.requests == [] and gw.balance() == CREDIT and gw.held() == 0 and gw.open_reservations() == 0


def test_the_sdk_raises_a_refusal_with_the_field_named(gw: Gateway, upstream: Scripted) -> None:
    with client(gw) as c, pytest.raises(anthropic.BadRequestError) as err:
        c.messages.create(model="oa/gpt", max_tokens=10, messages=[USER], extra_body={"top_k": 3})  # type: ignore[list-item]
    assert isinstance(err.value.body, dict) and err.value.body["error"]["param"] == "top_k"
    assert upstream.requests == []


@pytest.mark.parametrize(("status", "raised", "ours", "kind"), [
    (400, anthropic.BadRequestError, 400, "invalid_request_error"),
    (429, anthropic.RateLimitError, 429, "rate_limit_error"),
    (503, anthropic.InternalServerError, 502, "api_error"),
])
def test_provider_errors_reach_the_anthropic_client_in_its_shape(
        gw: Gateway, upstream: Scripted, status: int, raised: type[Exception], ours: int, kind: str) -> None:
    upstream.replies.append(Reply({"error": {"message": f"upstream failed (key {PROVIDER_KEY})", "type": "x"}},
                                  status=status))
    with client(gw) as c, pytest.raises(raised) as err:
        c.messages.create(model="oa/gpt", max_tokens=10, messages=[USER])  # type: ignore[list-item]
    assert isinstance(err.value, anthropic.APIStatusError) and err.value.status_code == ours
    body = err.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and "upstream failed" in body["error"]["message"]
    assert PROVIDER_KEY not in err.value.response.text
    assert gw.balance() == CREDIT and gw.open_reservations() == 0


def test_unknown_and_malformed_chunks(gw: Gateway, upstream: Scripted) -> None:
    good = chunks({"content": "Bon"}, {"content": "jour"})
    assert good.events is not None
    good.events.insert(2, b": keep-alive\n\n")
    good.events.insert(3, b'data: {"id":"x","object":"vendor.heartbeat"}\n\n')  # no choices: nothing to say
    upstream.replies.append(good)
    with client(gw) as c, c.messages.stream(model="oa/gpt", max_tokens=64, messages=[USER]) as stream:  # type: ignore[list-item]
        assert "".join(stream.text_stream) == "Bonjour"
        rid = stream.response.headers["x-request-id"]
    assert_charged(gw, rid)

    bad = chunks({"content": "Bon"}, {"content": "jour"})
    assert bad.events is not None
    bad.events.insert(2, b"data: {broken\n\n")
    upstream.replies.append(bad)
    rid, err = failed_stream(gw)
    assert "cannot be translated" in str(err)
    row = gw.usage_row(rid)  # the provider finished (and bills) its answer: its usage is charged
    assert row["cost_micros"] == CHARGE and row["estimated"] is False and gw.open_reservations() == 0


def test_after_a_malformed_chunk_the_stream_ends_at_its_one_error_event(gw: Gateway, upstream: Scripted) -> None:
    """The client was told at the malformed chunk; if the provider then finishes and
    closes without [DONE], that is no second failure (no 'stream cut' event after it)."""
    bad = chunks({"content": "Bon"}, {"content": "jour"}, done=False)
    assert bad.events is not None
    bad.events.insert(2, b"data: {broken\n\n")
    upstream.replies.append(bad)
    r = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": gw.key},
                   json={"model": "oa/gpt", "max_tokens": 10, "stream": True, "messages": [USER]})
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names.count("error") == 1 and names[-1] == "error", names
    assert "message_stop" not in names and "cannot be translated" in r.text and "closed the stream" not in r.text
    row = gw.usage_row(r.headers["x-request-id"])
    assert row["cost_micros"] == CHARGE and gw.open_reservations() == 0


def closing_events(gw: Gateway, reply: Reply, upstream: Scripted) -> list[str]:
    """The names of the events a raw /v1/messages stream of `reply` ends with."""
    upstream.replies.append(reply)
    r = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": gw.key},
                   json={"model": "oa/gpt", "max_tokens": 10, "stream": True, "messages": [USER]})
    return [line[7:] for line in r.text.splitlines() if line.startswith("event: ")][-3:]


def test_a_stream_closed_after_its_finish_without_done_ends_normally(gw: Gateway, upstream: Scripted) -> None:
    """finish_reason and usage came, then the connection closed without `data: [DONE]`:
    the answer is whole, so (as on a same-format stream) it is no error, and the client
    gets the closing events of its format, with the provider's usage."""
    upstream.replies.append(chunks({"content": "Bon"}, {"content": "jour"}, finish="length", done=False))
    with client(gw) as c, c.messages.stream(model="oa/gpt", max_tokens=64, messages=[USER]) as stream:  # type: ignore[list-item]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        rid = stream.response.headers["x-request-id"]
    assert text == "Bonjour" and final.stop_reason == "max_tokens"
    u = final.usage
    assert (u.input_tokens, u.cache_read_input_tokens, u.output_tokens) == (300, 1000, 50)
    assert_charged(gw, rid)
    reply = chunks({"content": "Hi"}, done=False)
    assert closing_events(gw, reply, upstream) == ["content_block_stop", "message_delta", "message_stop"]


@pytest.mark.parametrize("done", [True, False], ids=["done", "closed_after_finish"])
def test_a_stream_that_ends_without_usage_is_charged_the_estimate_it_shows(
        gw: Gateway, upstream: Scripted, done: bool) -> None:
    """No usage from the provider: the estimate is charged, and the closing message_delta
    carries it, so the client's numbers are the bill's (also when [DONE] never came)."""
    words = ["A rather long answer ", "that never ", "reports usage."]
    upstream.replies.append(chunks(*({"content": w} for w in words), usage=False, done=done))
    body = {"model": "oa/gpt", "max_tokens": 64, "messages": [USER]}
    with client(gw) as c, c.messages.stream(**body) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
        rid = stream.response.headers["x-request-id"]
    assert final.content[0].text == "".join(words) and final.stop_reason == "end_turn"  # type: ignore[union-attr]
    prompt = estimate_prompt_tokens(body)
    out = tokens_from_bytes(len("".join(words)))
    row = gw.usage_row(rid)
    assert row["estimated"] is True and (row["prompt_tokens"], row["completion_tokens"]) == (prompt, out)
    assert row["cost_micros"] == prompt * 3 + out * 15 and gw.open_reservations() == 0
    u = final.usage
    assert (u.input_tokens, u.output_tokens, u.cache_read_input_tokens) == (prompt, out, 0)


def test_a_stream_cut_before_its_finish_gives_an_error_event(gw: Gateway, upstream: Scripted) -> None:
    cut = chunks({"content": "Half an ans"}, usage=False, done=False)
    assert cut.events is not None
    upstream.replies.append(Reply(events=cut.events[:-1]))  # closed before the finish_reason chunk
    rid, err = failed_stream(gw)
    assert "closed the stream" in str(err)
    row = gw.usage_row(rid)  # written by the settle, which follows the error event
    assert row["estimated"] is True and row["completion_tokens"] == tokens_from_bytes(len("Half an ans"))
    assert gw.open_reservations() == 0


def test_a_stream_closed_with_usage_but_no_finish_is_cut_and_charged_its_usage(
        gw: Gateway, upstream: Scripted) -> None:
    """A usage chunk but no finish_reason: the answer's end is unknown, so the client is
    told the stream was cut, and the provider's usage is what it costs."""
    upstream.replies.append(Reply(events=[openai_chunk({"role": "assistant", "content": ""}),
                                          openai_chunk({"content": "Half"}), openai_chunk(usage=USAGE, choices=False)]))
    rid, err = failed_stream(gw)
    assert "closed the stream" in str(err)
    assert_charged(gw, rid)


def test_the_translated_body_bounds_the_reservation_when_it_is_larger(
        launch: Callable[..., Gateway], upstream: Scripted) -> None:
    """Tool inputs become JSON strings, escaped once more: the provider reads a larger body
    than the client sent, and the hold covers that one (inbound.widen)."""
    messages = [USER, {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "f",
                                                           "input": {"q": '"' * 3000}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c", "content": "ok"}]}]
    body = {"model": "oa/gpt", "max_tokens": 1, "messages": messages}
    raw_size = len(orjson.dumps(body))
    translated = len(orjson.dumps(to_openai.request(json.loads(json.dumps(body)), "max_tokens")))
    assert translated > raw_size + 5000
    hold = translated * 3 + 1 * 15  # every prompt token at $3/M (the dearest input price), 1 output at $15/M
    assert raw_size * 3 + 15 < hold - 1  # the client's body alone is covered by one micro-dollar less
    gw = launch(upstream.url, models=MODELS, credit_micros=hold - 1)
    r = httpx.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": gw.key})
    assert r.status_code == 402 and upstream.requests == []
    gw.run(lambda svc: svc.ledger.credit(gw.tenant_id, 1, "one-more"))
    upstream.replies.append(completion({"content": "ok"}))
    r = httpx.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": gw.key})
    assert r.status_code == 200 and gw.balance() == hold - CHARGE


def test_the_offline_echo_model_answers_the_anthropic_client(gw: Gateway) -> None:
    """The starter config's echo model (OpenAI-format, served in process) works from the
    anthropic SDK too, streaming and not, billed on the usage it reports."""
    with client(gw) as c:
        msg = c.messages.create(model="demo/echo", max_tokens=50, messages=[USER])  # type: ignore[list-item]
        assert msg.content[0].text == "Hello" and msg.usage.output_tokens > 0  # type: ignore[union-attr]
        with c.messages.stream(model="demo/echo", max_tokens=50, messages=[USER]) as stream:  # type: ignore[list-item]
            assert "".join(stream.text_stream) == "Hello"
            final = stream.get_final_message()
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0 and final.stop_reason == "end_turn"
    assert gw.open_reservations() == 0 and gw.balance() < CREDIT


def test_parallel_tool_calls_become_blocks_and_interleaved_pieces_an_error(gw: Gateway, upstream: Scripted) -> None:
    def call(i: int, args: str, head: bool) -> dict[str, Any]:
        fn = {"name": "get_weather", "arguments": args} if head else {"arguments": args}
        return {"tool_calls": [{"index": i, **({"id": f"call_{i}", "type": "function"} if head else {}),
                                "function": fn}]}

    upstream.replies.append(chunks(call(0, '{"city":', True), call(0, '"Paris"}', False),
                                   call(1, '{"city":"Oslo"}', True), finish="tool_calls"))
    with client(gw) as c, c.messages.stream(model="oa/gpt", max_tokens=64, messages=[USER],  # type: ignore[list-item]
                                            tools=[WEATHER]) as stream:  # type: ignore[list-item]
        final = stream.get_final_message()
    assert [(b.id, b.input) for b in final.content if b.type == "tool_use"] == [
        ("call_0", {"city": "Paris"}), ("call_1", {"city": "Oslo"})]

    # Pieces of call 0 after call 1 started: Anthropic's blocks cannot go back; the client is told.
    upstream.replies.append(chunks(call(0, '{"city":', True), call(1, "{}", True), call(0, '"Paris"}', False),
                                   finish="tool_calls"))
    rid, err = failed_stream(gw)
    assert "interleave" in str(err) and gw.usage_row(rid)["cost_micros"] == CHARGE
