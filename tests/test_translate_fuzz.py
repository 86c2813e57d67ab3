"""Property-based fuzzing of translated calls (Hypothesis), both sides hostile.

Clients: messages, content parts, tool calls and tools of any shape on a chat client
calling an Anthropic model and an Anthropic client calling an OpenAI-format model; the
invariants of tests/test_fuzz_v1.py (no 5xx, an error body, no charge for a refusal,
nothing left reserved). Providers: answers and stream events of any shape; a 200 or a
502 `upstream_invalid_response`, never a 500, and every hold settled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ServerThread
from tests.fakes.harness import Gateway, launcher
from tests.fakes.scripted_upstream import Reply, Scripted
from tests.test_fuzz_v1 import FUZZ, TolerantUpstream, check, json_values, post
from tollway.config import Config

pytestmark = pytest.mark.fuzz

PRICES = {"input_usd_per_mtok": "1.00", "output_usd_per_mtok": "2.00", "max_input_tokens": 100_000}
ROUTES = [("/v1/chat/completions", "anthropic/sonnet"), ("/v1/messages", "acme/chat")]

kinds = st.sampled_from(["text", "image_url", "image", "tool_use", "tool_result", "thinking", "input_audio",
                         "document", "refusal", 3, None])
keys = ["text", "image_url", "source", "id", "name", "input", "content", "tool_use_id", "cache_control",
        "citations", "is_error", "url", "detail"]
parts = st.builds(lambda kind, extra: {"type": kind, **extra}, kinds,
                  st.dictionaries(st.sampled_from(keys), json_values, max_size=3))
contents = st.one_of(st.text(max_size=20), json_values, st.lists(parts, max_size=3))
tool_calls = st.lists(st.fixed_dictionaries({}, optional={
    "id": json_values, "type": st.sampled_from(["function", "x"]) | json_values,
    "function": st.fixed_dictionaries({}, optional={"name": json_values, "arguments": st.text(max_size=20)
                                                    | json_values})}), max_size=2)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]) | json_values},
    optional={"content": contents, "tool_calls": tool_calls | json_values, "tool_call_id": json_values,
              "name": json_values}), min_size=1, max_size=4)
tools = st.lists(st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["function", "custom"]) | json_values, "name": json_values,
    "function": st.dictionaries(st.sampled_from(["name", "parameters", "description", "strict"]), json_values,
                                max_size=3),
    "input_schema": json_values}), max_size=2)
extras = st.fixed_dictionaries({}, optional={
    "tools": tools | json_values, "tool_choice": json_values, "system": contents, "stop": json_values,
    "stop_sequences": json_values, "stream_options": json_values, "parallel_tool_calls": json_values,
    "metadata": json_values, "n": json_values, "thinking": json_values})


@pytest.fixture
def gw(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread]) -> Iterator[Gateway]:
    upstream = serve_app(TolerantUpstream().app).url
    models = [{"id": "acme/chat", "provider": "fake", "upstream": "m", **PRICES},
              {"id": "anthropic/sonnet", "provider": "claude", "upstream": "s", **PRICES}]
    for launch in launcher(make_config, serve_app):
        yield launch(upstream, models=models, anthropic_url=upstream, credit_micros=1_000_000_000,
                     server={"retry_attempts": 0})


@FUZZ
@given(route=st.sampled_from(ROUTES), msgs=messages, more=extras, stream=st.booleans())
def test_any_client_body_is_translated_or_refused_never_a_5xx(gw: Gateway, route: tuple[str, str],
                                                              msgs: list[Any], more: dict[str, Any],
                                                              stream: bool) -> None:
    endpoint, model = route
    body = {"model": model, "max_tokens": 16, "messages": msgs, **more, "stream": stream}
    with httpx.Client(timeout=30) as client:
        before = gw.balance()
        check(gw, post(gw, client, endpoint, orjson.dumps(body), {"content-type": "application/json"}), before)


# --- hostile providers ------------------------------------------------------------------------

@pytest.fixture
def scripted() -> Scripted:
    return Scripted()


@pytest.fixture
def hostile(make_config: Callable[..., Config], serve_app: Callable[[Any], ServerThread],
            scripted: Scripted) -> Iterator[Gateway]:
    url = serve_app(scripted.app).url
    models = [{"id": "acme/chat", "provider": "fake", "upstream": "m", **PRICES},
              {"id": "anthropic/sonnet", "provider": "claude", "upstream": "s", **PRICES}]
    for launch in launcher(make_config, serve_app):
        yield launch(url, models=models, anthropic_url=url, credit_micros=1_000_000_000)


a_blocks = st.lists(st.builds(lambda kind, extra: {"type": kind, **extra},
                              st.sampled_from(["text", "tool_use", "thinking", "redacted_thinking", "image"])
                              | json_values, st.dictionaries(st.sampled_from(["text", "id", "name", "input",
                                                                              "thinking"]), json_values,
                                                             max_size=3)), max_size=3)
anthropic_answers = st.fixed_dictionaries({"content": a_blocks | json_values}, optional={
    "stop_reason": json_values, "id": json_values, "usage": st.just({"input_tokens": 3, "output_tokens": 2})})
c_messages = st.fixed_dictionaries({}, optional={
    "content": json_values, "tool_calls": tool_calls | json_values, "reasoning_content": json_values,
    "refusal": json_values})
openai_answers = st.fixed_dictionaries({"choices": st.lists(st.fixed_dictionaries(
    {"message": c_messages | json_values}, optional={"finish_reason": json_values, "index": json_values}),
    max_size=2) | json_values}, optional={"usage": st.just({"prompt_tokens": 3, "completion_tokens": 2})})
event_names = st.sampled_from(["message_start", "content_block_start", "content_block_delta",
                               "content_block_stop", "message_delta", "error", "ping", "other"])
anthropic_events = st.lists(st.builds(
    lambda name, data: b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n",
    event_names, st.dictionaries(st.sampled_from(["index", "delta", "content_block", "message", "usage", "error"]),
                                 json_values | st.fixed_dictionaries({}, optional={
                                     "type": st.sampled_from(["text_delta", "input_json_delta", "tool_use",
                                                              "text", "x"]),
                                     "text": json_values, "partial_json": json_values}), max_size=3)),
    max_size=6)
openai_events = st.lists(st.builds(
    lambda data: b"data: " + orjson.dumps(data) + b"\n\n",
    st.fixed_dictionaries({}, optional={"choices": st.lists(st.fixed_dictionaries({}, optional={
        "delta": st.fixed_dictionaries({}, optional={"content": json_values, "tool_calls": tool_calls | json_values,
                                                     "reasoning_content": json_values}) | json_values,
        "finish_reason": json_values, "index": st.sampled_from([0, 1]) | json_values}), max_size=2) | json_values,
        "error": json_values, "id": json_values})), max_size=6)


@FUZZ
@given(route=st.sampled_from(ROUTES), answer=st.one_of(anthropic_answers, openai_answers),
       events=st.one_of(anthropic_events, openai_events), stream=st.booleans(), end=st.booleans())
def test_any_provider_answer_is_translated_or_a_502_never_a_500(
        hostile: Gateway, scripted: Scripted, route: tuple[str, str], answer: dict[str, Any],
        events: list[bytes], stream: bool, end: bool) -> None:
    endpoint, model = route
    if stream:
        done = b"data: [DONE]\n\n" if endpoint == "/v1/messages" else b"event: message_stop\ndata: {}\n\n"
        scripted.replies.append(Reply(events=[*events, *([done] if end else [])]))
    else:
        scripted.replies.append(Reply(answer))
    body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    r = httpx.post(hostile.url + endpoint, json=body, headers={"authorization": f"Bearer {hostile.key}"},
                   timeout=30)
    assert r.status_code == 200 or (r.status_code == 502 and r.json()["error"]["code"] in (
        "upstream_invalid_response", "upstream_invalid_usage")), (r.status_code, r.text[:300])
    deadline = time.monotonic() + 5
    while hostile.open_reservations() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hostile.open_reservations() == 0
