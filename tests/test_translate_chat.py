"""The official `openai` client on a Claude model: /v1/chat/completions translated to
Anthropic's Messages API and back (providers/translate/to_anthropic.py), against a
scripted Anthropic provider on loopback. Billing is the provider's own usage at the
model's prices, to the micro-dollar."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ServerThread
from tests.fakes.harness import ANTHROPIC_KEY, Gateway, launcher
from tests.fakes.scripted_upstream import Reply, Scripted, anthropic_event, charged
from tollway.config import Config
from tollway.money import format_usd

PRICES = {"input_usd_per_mtok": "3.00", "output_usd_per_mtok": "15.00",
          "cached_input_usd_per_mtok": "0.30", "cache_write_usd_per_mtok": "3.75"}
MAX_OUTPUT = 4096
USAGE = {"input_tokens": 100, "output_tokens": 50, "cache_read_input_tokens": 1000,
         "cache_creation_input_tokens": 200}
# 100 x $3 + 1000 x $0.30 + 200 x $3.75 + 50 x $15 per million tokens, in micro-dollars.
CHARGE = 300 + 300 + 750 + 750
CREDIT = 10_000_000
SYSTEM = {"role": "system", "content": "Answer in French."}
USER = {"role": "user", "content": "Hello"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


@pytest.fixture
def upstream() -> Scripted:
    return Scripted()


@pytest.fixture
def gw(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
       upstream: Scripted) -> Iterator[Gateway]:
    url = serve_app(upstream.app).url
    models = [{"id": "claude/sonnet", "provider": "claude", "upstream": "claude-up", "max_output_tokens": MAX_OUTPUT,
               "max_input_tokens": 200_000, **PRICES}]
    for launch in launcher(make_config, serve_app):
        # One attempt: a scripted reply is the provider's answer (retries: test_fallback.py).
        yield launch(url, models=models, anthropic_url=url, credit_micros=CREDIT, server={"retry_attempts": 0})


def message(content: list[dict[str, Any]], stop: str = "end_turn") -> Reply:
    return Reply({"id": "msg_up1", "type": "message", "role": "assistant", "model": "claude-up-2025",
                  "content": content, "stop_reason": stop, "stop_sequence": None, "usage": USAGE})


def stream_of(blocks: list[bytes], stop: str = "end_turn", usage: dict[str, Any] | None = None) -> Reply:
    start = {"id": "msg_up1", "type": "message", "role": "assistant", "model": "claude-up-2025", "content": [],
             "stop_reason": None, "stop_sequence": None,
             "usage": {**USAGE, "output_tokens": 1}}
    return Reply(events=[anthropic_event("message_start", message=start), anthropic_event("ping"), *blocks,
                         anthropic_event("message_delta", delta={"stop_reason": stop, "stop_sequence": None},
                                         usage=usage or {"output_tokens": USAGE["output_tokens"]}),
                         anthropic_event("message_stop")])


def text_blocks(*words: str) -> list[bytes]:
    return [anthropic_event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
            *(anthropic_event("content_block_delta", index=0, delta={"type": "text_delta", "text": w})
              for w in words),
            anthropic_event("content_block_stop", index=0)]


def assert_charged(gw: Gateway, request_id: str) -> dict[str, Any]:
    return charged(gw, request_id, CHARGE, CREDIT)


def failed_stream(gw: Gateway) -> tuple[str, openai.APIError]:
    """Stream a chat answer that fails on the way: the request id and what the SDK raised."""
    with (pytest.raises(openai.APIError) as err,
          gw.client().chat.completions.with_streaming_response.create(
              model="claude/sonnet", messages=[USER], stream=True) as raw):
        rid = raw.headers["x-request-id"]
        for _ in raw.parse():
            pass
    return rid, err.value


def test_text_and_system_prompt(gw: Gateway, upstream: Scripted) -> None:
    upstream.replies.append(message([{"type": "text", "text": "Bonjour !"}]))
    raw = gw.client().chat.completions.with_raw_response.create(
        model="claude/sonnet", messages=[SYSTEM, USER], temperature=0.5, top_p=0.9, stop="END", user="end-user-1")
    reply = raw.parse()
    assert reply.choices[0].message.content == "Bonjour !" and reply.choices[0].finish_reason == "stop"
    assert reply.model == "claude/sonnet" and reply.object == "chat.completion"
    u = reply.usage
    assert u is not None and (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (1300, 50, 1350)
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens == 1000
    assert raw.headers["x-tollway-cost-usd"] == format_usd(CHARGE) == "0.002100"
    row = assert_charged(gw, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (1300, 1000, 50)
    path, headers, body = upstream.requests[-1]
    assert path == "/v1/messages" and headers["x-api-key"] == ANTHROPIC_KEY and "ak_" not in repr(headers)
    assert headers["anthropic-version"] == "2023-06-01" and "authorization" not in headers
    assert body["model"] == "claude-up" and body["max_tokens"] == MAX_OUTPUT  # required by Anthropic: the bound
    assert body["system"] == [{"type": "text", "text": "Answer in French."}]
    assert body["messages"] == [{"role": "user", "content": "Hello"}]
    assert (body["temperature"], body["top_p"], body["stop_sequences"]) == (0.5, 0.9, ["END"])
    # The end user's id is the tenant's pseudonym of it (tenant_tag.py), never the raw value.
    assert set(body) == {"model", "max_tokens", "system", "messages", "temperature", "top_p", "stop_sequences",
                         "metadata"} and body["metadata"]["user_id"] != "end-user-1"


def test_a_tool_call_round_trip(gw: Gateway, upstream: Scripted) -> None:
    upstream.replies.append(message([{"type": "text", "text": "Let me look."},
                                     {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                      "input": {"city": "Paris"}}], stop="tool_use"))
    client = gw.client()
    first = client.chat.completions.create(model="claude/sonnet", messages=[USER], tools=[WEATHER],
                                           tool_choice="auto", parallel_tool_calls=False, max_tokens=100)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.id == "toolu_1" and call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    sent = upstream.requests[-1][2]
    assert sent["tools"] == [{"name": "get_weather", "description": "Weather in a city", "input_schema":
                              WEATHER["function"]["parameters"]}]  # type: ignore[index]
    assert sent["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True} and sent["max_tokens"] == 100

    upstream.replies.append(message([{"type": "text", "text": "18 degrees in Paris."}]))
    history = [USER, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}]
    second = client.chat.completions.create(model="claude/sonnet", messages=history, tools=[WEATHER])
    assert second.choices[0].message.content == "18 degrees in Paris."
    assert upstream.requests[-1][2]["messages"] == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"}]}]
    assert gw.balance() == CREDIT - 2 * CHARGE and gw.open_reservations() == 0


def test_images_by_url_and_base64(gw: Gateway, upstream: Scripted) -> None:
    upstream.replies.append(message([{"type": "text", "text": "A cat."}]))
    parts = [{"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "auto"}}]
    gw.client().chat.completions.create(model="claude/sonnet", messages=[{"role": "user", "content": parts}])
    assert upstream.requests[-1][2]["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]


@pytest.mark.parametrize("include_usage", [True, False])
def test_streaming_text(gw: Gateway, upstream: Scripted, include_usage: bool) -> None:
    upstream.replies.append(stream_of(text_blocks("Bon", "jour", " !")))
    opts: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    with gw.client().chat.completions.with_streaming_response.create(
            model="claude/sonnet", messages=[SYSTEM, USER], stream=True, stream_options=opts) as raw:
        chunks = list(raw.parse())
        rid = raw.headers["x-request-id"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Bonjour !"
    assert all(c.model == "claude/sonnet" and c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    with_usage = [c for c in chunks if c.usage is not None]
    if include_usage:  # the usage chunk only when asked, last, with no choices (as OpenAI sends it)
        assert with_usage == [chunks[-1]] and chunks[-1].choices == []
        u = chunks[-1].usage
        assert u is not None and (u.prompt_tokens, u.completion_tokens) == (1300, 50)
        assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens == 1000
    else:
        assert with_usage == []
    assert_charged(gw, rid)
    assert "stream_options" not in upstream.requests[-1][2] and upstream.requests[-1][2]["stream"] is True


def test_streamed_tool_call_arguments_split_across_many_deltas(gw: Gateway, upstream: Scripted) -> None:
    arguments = json.dumps({"city": "Paris", "unit": "celsius", "note": "caf\u00e9 \"quoted\""})
    pieces = [arguments[i:i + 3] for i in range(0, len(arguments), 3)]
    blocks = [*text_blocks("Checking."),
              anthropic_event("content_block_start", index=1, content_block={
                  "type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {}}),
              *(anthropic_event("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": p})
                for p in pieces),
              anthropic_event("content_block_stop", index=1)]
    upstream.replies.append(stream_of(blocks, stop="tool_use"))
    stream = gw.client().chat.completions.create(model="claude/sonnet", messages=[USER], tools=[WEATHER],
                                                 stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for c in stream:
        for tc in c.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += tc.id or ""
            entry["name"] += tc.function.name or "" if tc.function else ""
            entry["arguments"] += tc.function.arguments or "" if tc.function else ""
        finish = c.choices[0].finish_reason or finish
    assert calls == {0: {"id": "toolu_9", "name": "get_weather", "arguments": arguments}}
    assert finish == "tool_calls" and gw.balance() == CREDIT - CHARGE


@pytest.mark.parametrize(("field", "value", "param"), [
    ("n", 2, "n"),
    ("logprobs", True, "logprobs"),
    ("seed", 7, "seed"),
    ("response_format", {"type": "json_object"}, "response_format"),
    ("temperature", 1.5, "temperature"),
    ("reasoning_effort", "high", "reasoning_effort"),
    ("tools", [{"type": "custom", "custom": {"name": "x"}}], "tools[0].type"),
    ("messages", [USER, {"role": "assistant", "content": "Hi"}, SYSTEM], "messages[2]"),
    ("messages", [{"role": "user", "content": "Hi", "name": "ada"}], "messages[0].name"),
    ("messages", [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}],
     "messages[0].content[0]"),
    ("messages", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "high"}}]}],
     "messages[0].content[0].image_url.detail"),
])
def test_an_untranslatable_field_is_refused_and_nothing_is_forwarded_or_held(
        gw: Gateway, upstream: Scripted, field: str, value: Any, param: str) -> None:
    body: dict[str, Any] = {"model": "claude/sonnet", "messages": [USER], field: value}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {gw.key}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "unsupported_parameter" and param in err["message"]
    assert upstream.requests == [] and gw.balance() == CREDIT and gw.held() == 0 and gw.open_reservations() == 0


def test_a_refusal_quotes_no_client_text(gw: Gateway, upstream: Scripted) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"}, json={
        "model": "claude/sonnet", "messages": [{"role": "user", "content": "Hi", "my secret plan": 1}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0]"
    assert "secret" not in r.text and upstream.requests == []


def test_neutral_values_mean_nothing_and_are_accepted(gw: Gateway, upstream: Scripted) -> None:
    upstream.replies.append(message([{"type": "text", "text": "ok"}]))
    gw.client().chat.completions.create(model="claude/sonnet", messages=[USER], n=1, presence_penalty=0,
                                        frequency_penalty=0, logprobs=False, response_format={"type": "text"})
    # metadata: the gateway's own tenant tag (tenant_tag.py), nothing from the client.
    assert set(upstream.requests[-1][2]) - {"metadata"} == {"model", "max_tokens", "messages"}


def test_the_sdk_raises_a_refusal_with_the_field_named(gw: Gateway, upstream: Scripted) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        gw.client().chat.completions.create(model="claude/sonnet", messages=[USER], n=3)
    assert err.value.param == "n" and err.value.code == "unsupported_parameter"
    assert upstream.requests == []


@pytest.mark.parametrize(("status", "kind", "raised", "ours"), [
    (400, "invalid_request_error", openai.BadRequestError, 400),
    (429, "rate_limit_error", openai.RateLimitError, 429),
    (529, "overloaded_error", openai.InternalServerError, 502),
])
def test_provider_errors_reach_the_chat_client_in_openai_shape(
        gw: Gateway, upstream: Scripted, status: int, kind: str, raised: type[Exception], ours: int) -> None:
    upstream.replies.append(Reply({"type": "error", "error": {"type": kind, "message": f"upstream said {kind}"}},
                                  status=status))
    with pytest.raises(raised) as err:
        gw.client().chat.completions.create(model="claude/sonnet", messages=[USER])
    assert isinstance(err.value, openai.APIStatusError) and err.value.status_code == ours
    body = err.value.response.json()
    assert "type" not in body and body["error"]["message"].endswith(f"upstream said {kind}")
    assert ANTHROPIC_KEY not in err.value.response.text
    assert gw.balance() == CREDIT and gw.open_reservations() == 0


def test_unknown_event_types_mid_stream_are_skipped(gw: Gateway, upstream: Scripted) -> None:
    blocks = text_blocks("Bon", "jour")
    blocks.insert(2, anthropic_event("some_future_event", detail={"x": 1}))
    blocks.insert(3, b": a comment line\n\n")
    upstream.replies.append(stream_of(blocks))
    with gw.client().chat.completions.with_streaming_response.create(
            model="claude/sonnet", messages=[USER], stream=True) as raw:
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        rid = raw.headers["x-request-id"]
    assert text == "Bonjour"
    assert_charged(gw, rid)


def test_a_malformed_event_is_an_error_for_the_client_and_the_provider_usage_is_charged(
        gw: Gateway, upstream: Scripted) -> None:
    blocks = text_blocks("Bon", "jour")
    blocks.insert(2, b"event: content_block_delta\ndata: {not json\n\n")
    upstream.replies.append(stream_of(blocks))
    rid, err = failed_stream(gw)
    assert "cannot be translated" in str(err)
    # The provider finished its answer (and bills it): the charge is its own usage.
    assert_charged(gw, rid)


def test_an_upstream_error_event_mid_stream_reaches_the_client(gw: Gateway, upstream: Scripted) -> None:
    start = stream_of([]).events[:2]  # type: ignore[index]
    upstream.replies.append(Reply(events=[*start, *text_blocks("Hal")[:2], anthropic_event(
        "error", error={"type": "overloaded_error", "message": f"Overloaded (key {ANTHROPIC_KEY})"})]))
    rid, err = failed_stream(gw)
    assert "Overloaded" in str(err) and ANTHROPIC_KEY not in str(err)
    row = gw.usage_row(rid)
    # No usage came after message_start: its exact input counts, the output estimated from the text.
    assert row["estimated"] is True and row["prompt_tokens"] == 1300 and row["completion_tokens"] == 1
    assert row["cost_micros"] == 300 + 300 + 750 + 15 and gw.open_reservations() == 0


def test_a_stream_that_ends_without_usage_is_charged_the_estimate(gw: Gateway, upstream: Scripted) -> None:
    start = stream_of([]).events[:1]  # type: ignore[index]
    words = ["A rather long answer ", "that stops ", "before its usage."]
    upstream.replies.append(Reply(events=[*start, *text_blocks(*words)]))  # no message_delta, no message_stop
    rid, err = failed_stream(gw)
    assert "closed the stream" in str(err)
    completion = -(-len("".join(words)) // 4)
    row = gw.usage_row(rid)
    assert row["estimated"] is True and (row["prompt_tokens"], row["completion_tokens"]) == (1300, completion)
    assert row["cost_micros"] == 300 + 300 + 750 + completion * 15 and gw.open_reservations() == 0


def usage_stream(gw: Gateway, reply: Reply, upstream: Scripted) -> tuple[str, str, list[Any]]:
    """Stream `reply` with include_usage: the request id, the raw body and the parsed chunks."""
    upstream.replies.append(reply)
    with gw.client().chat.completions.with_streaming_response.create(
            model="claude/sonnet", messages=[USER], stream=True, stream_options={"include_usage": True}) as raw:
        rid, text = raw.headers["x-request-id"], raw.text()
    chunks = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: {") and '"chat.completion.chunk"' in line]
    return rid, text, chunks


def test_a_stream_closed_after_its_stop_reason_without_message_stop_ends_normally(
        gw: Gateway, upstream: Scripted) -> None:
    """message_delta (stop reason and usage) came, then the connection closed without
    message_stop: the answer is whole, so the chat client gets its usage chunk and
    `data: [DONE]`, and the provider's usage is charged."""
    events = stream_of(text_blocks("Bon", "jour")).events
    assert events is not None
    rid, text, chunks = usage_stream(gw, Reply(events=events[:-1]), upstream)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Bonjour"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 1300
    assert chunks[-1]["usage"]["completion_tokens"] == 50 and text.rstrip().endswith("data: [DONE]")
    assert_charged(gw, rid)


@pytest.mark.parametrize("stop", [True, False], ids=["message_stop", "closed_after_stop_reason"])
def test_a_stream_without_final_usage_shows_the_estimate_it_was_charged(
        gw: Gateway, upstream: Scripted, stop: bool) -> None:
    """message_delta without usage: the output count is estimated, charged, and the usage
    chunk carries that estimate, so the client's numbers are the bill's."""
    words = ["A rather long answer ", "with no ", "final count."]
    start = stream_of([]).events[:1]  # type: ignore[index]
    end = [anthropic_event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None})]
    rid, _, chunks = usage_stream(gw, Reply(events=[*start, *text_blocks(*words), *end,
                                                    *([anthropic_event("message_stop")] if stop else [])]), upstream)
    completion = -(-len("".join(words)) // 4)
    row = gw.usage_row(rid)
    assert row["estimated"] is True and (row["prompt_tokens"], row["completion_tokens"]) == (1300, completion)
    assert row["cost_micros"] == 300 + 300 + 750 + completion * 15 and gw.open_reservations() == 0
    u = chunks[-1]["usage"]
    assert (u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"]) == (
        1300, completion, 1000)


def test_an_answer_that_cannot_be_translated_is_a_502_and_released(gw: Gateway, upstream: Scripted) -> None:
    upstream.replies.append(message([{"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search",
                                      "input": {}}]))
    with pytest.raises(openai.InternalServerError) as err:
        gw.client().chat.completions.create(model="claude/sonnet", messages=[USER])
    assert err.value.code == "upstream_invalid_response" and err.value.status_code == 502
    assert gw.balance() == CREDIT and gw.open_reservations() == 0


def test_parallel_tool_calls_stream_as_separate_calls(gw: Gateway, upstream: Scripted) -> None:
    blocks: list[bytes] = []
    for i, city in enumerate(("Paris", "Oslo")):
        blocks += [anthropic_event("content_block_start", index=i, content_block={
                       "type": "tool_use", "id": f"toolu_{i}", "name": "get_weather", "input": {}}),
                   anthropic_event("content_block_delta", index=i, delta={
                       "type": "input_json_delta", "partial_json": json.dumps({"city": city})}),
                   anthropic_event("content_block_stop", index=i)]
    upstream.replies.append(stream_of(blocks, stop="tool_use"))
    chunks = list(gw.client().chat.completions.create(model="claude/sonnet", messages=[USER], tools=[WEATHER],
                                                      stream=True))
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert [(tc.index, tc.id) for tc in calls if tc.id] == [(0, "toolu_0"), (1, "toolu_1")]
    assert [tc.function.arguments for tc in calls if tc.function and tc.function.arguments] == [
        '{"city": "Paris"}', '{"city": "Oslo"}']


def test_an_openai_model_failing_falls_back_to_a_claude_model_translated(
        make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread], upstream: Scripted) -> None:
    """A provider outage absorbed across vendors: the OpenAI-format model answers 503, its
    fallback is a Claude model, and the chat client gets a chat answer from it, billed at
    the Claude model's prices, once, with the serving model named."""
    url = serve_app(upstream.app).url
    models = [{"id": "acme/gpt", "provider": "fake", "upstream": "gpt-up", "max_output_tokens": 1000,
               "max_input_tokens": 200_000, "input_usd_per_mtok": "1.00", "output_usd_per_mtok": "1.00",
               "fallbacks": ["claude/sonnet"]},
              {"id": "claude/sonnet", "provider": "claude", "upstream": "claude-up", "max_output_tokens": MAX_OUTPUT,
               "max_input_tokens": 200_000, **PRICES}]
    upstream.replies += [Reply({"error": {"message": "overloaded", "type": "server_error"}}, status=503),
                         message([{"type": "text", "text": "Bonjour"}])]
    for launch in launcher(make_config, serve_app):
        gw = launch(url, models=models, anthropic_url=url, credit_micros=CREDIT, server={"retry_attempts": 0})
        raw = gw.client().chat.completions.with_raw_response.create(model="acme/gpt", messages=[SYSTEM, USER])
        reply = raw.parse()
        assert reply.choices[0].message.content == "Bonjour" and reply.model == "claude/sonnet"
        assert raw.headers["x-tollway-model"] == "claude/sonnet" and raw.headers["x-tollway-attempts"] == "2"
        assert [path for path, _, _ in upstream.requests] == ["/v1/chat/completions", "/v1/messages"]
        sent = upstream.requests[1][2]
        assert sent["model"] == "claude-up" and sent["system"] == [{"type": "text", "text": "Answer in French."}]
        row = charged(gw, raw.headers["x-request-id"], CHARGE, CREDIT)
        assert row["model"] == "claude/sonnet" and row["requested_model"] == "acme/gpt" and row["attempts"] == 2
        assert raw.headers["x-tollway-cost-usd"] == format_usd(CHARGE)
