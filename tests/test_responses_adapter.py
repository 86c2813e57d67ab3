"""The Responses API's pure parts, without a server: the stream meter, the usage it reads,
the reservation's bounds (inbound.shape) and the stored-state refusals (stored.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tollway.config import ModelConfig, ProviderConfig
from tollway.errors import BadRequest
from tollway.money import Usage
from tollway.providers.base import MAX_TOKENS, RESPONSES, InvalidUsage
from tollway.providers.responses import ResponsesStream, parse_usage, serves_responses
from tollway.proxy.inbound import shape
from tollway.proxy.priced import CLIENT_TOOL_PROMPT_TOKENS, TOOLS_PROMPT_TOKENS

USAGE = {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 12}, "output_tokens": 30,
         "output_tokens_details": {"reasoning_tokens": 9}, "total_tokens": 70}


def ev(kind: str, named: bool = True, **data: Any) -> bytes:
    line = b"data: " + orjson.dumps({"type": kind, **data})
    return (b"event: " + kind.encode() + b"\n" + line) if named else line


def test_which_providers_serve_responses() -> None:
    def p(kind: str, url: str, mode: str = "auto") -> ProviderConfig:
        return ProviderConfig(type=kind, base_url=url, responses_api=mode)  # type: ignore[arg-type]

    assert serves_responses(p("openai", "https://api.openai.com/v1"))
    assert not serves_responses(p("openai", "https://api.deepseek.com/v1"))
    assert serves_responses(p("openai", "https://api.x.ai/v1", "on"))
    assert not serves_responses(p("openai", "https://api.openai.com/v1", "off"))
    assert not serves_responses(p("anthropic", "https://api.anthropic.com"))
    assert serves_responses(p("echo", ""))


def test_usage_is_read_with_cached_and_reasoning_tokens_and_bounded() -> None:
    assert parse_usage(USAGE) == Usage(40, 30, cached_tokens=12, reasoning_tokens=9)
    assert parse_usage(None) is None and parse_usage({"total_tokens": 3}) is None
    assert parse_usage({"input_tokens": 5, "input_tokens_details": None}) == Usage(5, 0)
    for bad in (-1, MAX_TOKENS + 1, 7.0, "7", True):
        with pytest.raises(InvalidUsage):
            parse_usage({**USAGE, "output_tokens_details": {"reasoning_tokens": bad}})


@pytest.mark.parametrize("named", [True, False])
def test_the_meter_restores_the_slug_reads_usage_and_ends_on_the_final_event(named: bool) -> None:
    meter = ResponsesStream("acme/resp")
    created = ev("response.created", named, sequence_number=0,
                 response={"id": "resp_1", "model": "gpt-x-2025", "usage": None, "error": None,
                           "metadata": {"note": "keep"}})
    out = meter.feed(created)
    assert out is not None and out.startswith(b"event: response.created\n" if named else b"data: ")
    sent = orjson.loads(out.split(b"data: ", 1)[1])
    assert sent["response"]["model"] == "acme/resp" and sent["response"]["metadata"] == {"note": "keep"}
    assert meter.usage() is None and not meter.done
    # A delta passes untouched, counted; generated text shaped like a lifecycle event is only text.
    delta = ev("response.output_text.delta", named, delta='{"response":{"model":"x"}}', item_id="msg_1")
    assert meter.feed(delta) == delta
    counted = len(orjson.dumps('{"response":{"model":"x"}}')) - 2  # the JSON-escaped text
    assert meter.text_bytes == counted
    done = ev("response.output_text.done", named, text="whole text again")
    assert meter.feed(done) == done and meter.text_bytes == counted  # `.done` repeats text: not counted
    final = meter.feed(ev("response.completed", named, response={"id": "resp_1", "model": "gpt-x-2025",
                                                                 "usage": USAGE}))
    assert final is not None and b'"model":"acme/resp"' in final and b"gpt-x" not in final
    assert meter.done and meter.usage() == Usage(40, 30, cached_tokens=12, reasoning_tokens=9)


@pytest.mark.parametrize("kind", ["response.incomplete", "response.failed"])
def test_incomplete_and_failed_end_the_stream_with_their_usage(kind: str) -> None:
    meter = ResponsesStream("s")
    meter.feed(ev(kind, response={"model": "m", "usage": USAGE, "error": {"code": "x", "message": "y"}}))
    assert meter.done and meter.usage() == Usage(40, 30, cached_tokens=12, reasoning_tokens=9)


def test_an_absurd_usage_is_flagged_and_the_event_still_delivered() -> None:
    meter = ResponsesStream("s")
    event = ev("response.completed", response={"model": "m", "usage": {**USAGE, "input_tokens": 10**12}})
    out = meter.feed(event)
    assert out is not None and b"1000000000000" in out
    assert isinstance(meter.invalid, InvalidUsage) and meter.usage() is None and meter.done


def test_an_error_event_or_unparseable_event_does_not_end_the_stream() -> None:
    meter = ResponsesStream("s")
    err = ev("error", code="server_error", message="boom")
    assert meter.feed(err) == err and not meter.done
    broken = b'data: {"type":"response.completed","response":{'
    assert meter.feed(broken) == broken and not meter.done and meter.usage() is None


MODEL = ModelConfig(id="a/m", provider="p", upstream="m", input_usd_per_mtok="1",  # type: ignore[arg-type]
                    output_usd_per_mtok="1", max_output_tokens=1000)  # type: ignore[arg-type]


def responses_shape(body: dict[str, Any], model: ModelConfig = MODEL) -> tuple[int, int, dict[str, Any]]:
    size = len(orjson.dumps(body))
    sh = shape(RESPONSES, body, size, model, {})
    return sh.prompt_bound - size, sh.completion_bound, body


def test_the_bounds_of_a_responses_request() -> None:
    extra, output, body = responses_shape({"model": "a/m", "input": "hi"})
    assert (extra, output, body["max_output_tokens"]) == (0, 1000, 1000)
    extra, output, body = responses_shape({"model": "a/m", "input": "hi", "max_output_tokens": 50})
    assert (output, body["max_output_tokens"]) == (50, 50)
    tools = [{"type": "function", "name": "f"}, {"type": "shell"}, {"type": "apply_patch"}]
    extra, _, _ = responses_shape({"model": "a/m", "input": "hi", "tools": tools})
    assert extra == TOOLS_PROMPT_TOKENS + 2 * CLIENT_TOOL_PROMPT_TOKENS
    # An input whose bytes do not bound its tokens reserves the model's context window.
    windowed = ModelConfig(**{**MODEL.__dict__, "max_input_tokens": 128_000})
    for item in ({"type": "reasoning", "summary": [], "encrypted_content": "gAAA"},
                 {"role": "user", "content": [{"type": "input_image", "image_url": "https://x.invalid/a.png"}]}):
        sh = shape(RESPONSES, {"model": "a/m", "input": [item]}, 100, windowed, {})
        assert sh.prompt_bound == 128_000


@pytest.mark.parametrize(("body", "param"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"store": True}, "store"),
    ({"background": True}, "background"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": ["x", {"role": "user", "content": "a"}, {"type": "reasoning", "id": "rs_1", "summary": []}]},
     "input[2]"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0].type"),
])
def test_stored_state_and_built_in_tools_are_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as err:
        shape(RESPONSES, {"model": "a/m", "input": "hi", **body}, 100, MODEL, {})
    assert err.value.param == param and err.value.instance_code == "unsupported_parameter"


def test_what_stays_accepted() -> None:
    for body in ({"store": False}, {"background": False}, {"previous_response_id": None}, {"prompt": None},
                 {"include": ["reasoning.encrypted_content"], "reasoning": {"effort": "low"}},
                 {"service_tier": "flex"}, {"text": {"format": {"type": "json_object"}}, "truncation": "auto"}):
        shape(RESPONSES, {"model": "a/m", "input": "hi", **body}, 100, MODEL, {})


def test_config_check_says_which_providers_serve_responses(make_config: Any) -> None:
    from tollway.surface import describe, render_text

    cfg = make_config(providers={"echo": {"type": "echo"}, "ds": {
        "type": "openai", "base_url": "https://api.deepseek.com/v1", "api_key_env": "DS_KEY"}})
    surface = describe(cfg)
    assert {p["name"]: p["serves_responses_api"] for p in surface["providers"]} == {"echo": True, "ds": False}
    routes = {r["path"] for r in surface["routes"]}
    assert {"/v1/responses", "/v1/messages/count_tokens"} <= routes
    text = render_text(surface)
    assert "(served in-process)  key: $-  /v1/responses" in text and "DS_KEY\n" in text
