"""Adapters are pure: request patching, header building, usage reading and stream
metering, tested without any network."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

import orjson
import pytest

from tollway.config import ProviderConfig
from tollway.errors import UpstreamTimeout
from tollway.money import Usage
from tollway.providers import ADAPTERS
from tollway.providers.anthropic import AnthropicAdapter, messages_url
from tollway.providers.base import (
    InvalidUsage,
    Target,
    UpstreamRequest,
    escaped_text_bytes,
    estimate_prompt_tokens,
    merge_headers,
    sse_data,
    text_markers,
    upstream_error_details,
)
from tollway.providers.echo import EchoTransport
from tollway.providers.openai import OpenAIAdapter, parse_usage

OPENAI = OpenAIAdapter()
PROVIDER = ProviderConfig(type="openai", base_url="https://gw.example/v1/acct/gw/openai/", api_key_env="K",
                          extra_headers={"X-Team": "core"}, cf_collect_log_payload=False, name="cf")
TARGET = Target("acme/gpt", "gpt-4o", "cf", PROVIDER.base_url, OPENAI.static_headers(PROVIDER, "sk-secret", "cftok"))


def test_static_headers_carry_auth_extras_and_cloudflare_options() -> None:
    h = TARGET.headers
    assert h["authorization"] == "Bearer sk-secret" and h["user-agent"].startswith("tollway/")
    assert h["x-team"] == "core" and h["cf-aig-collect-log-payload"] == "false"
    assert h["cf-aig-authorization"] == "Bearer cftok"
    plain = OPENAI.static_headers(ProviderConfig(type="openai", base_url="https://x", api_key_env="K"), "k", None)
    assert "cf-aig-collect-log-payload" not in plain and "cf-aig-authorization" not in plain


def test_prepare_patches_model_and_usage_only() -> None:
    body: dict[str, Any] = {"model": "acme/gpt", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                            "stream_options": {"include_obfuscation": False}, "vendor_field": {"a": [1, 2.5]},
                            "temperature": 0.7}
    headers = merge_headers({"content-type": "text/plain", "accept": "text/event-stream"}, TARGET.headers,
                            {"cf-aig-metadata": "{}"})
    req = OPENAI.prepare(TARGET, "chat", body, True, headers)
    assert req.url == "https://gw.example/v1/acct/gw/openai/chat/completions" and req.stream
    sent = orjson.loads(req.body)
    assert sent == {**body, "model": "gpt-4o", "stream_options": {"include_obfuscation": False,
                                                                  "include_usage": True}}
    assert req.headers["content-type"] == "application/json" and req.headers["accept"] == "text/event-stream"
    assert req.headers["cf-aig-metadata"] == "{}"
    plain = OPENAI.prepare(TARGET, "embeddings", {"model": "acme/gpt", "input": "x"}, False, {})
    assert plain.url.endswith("/openai/embeddings") and "stream_options" not in orjson.loads(plain.body)


def test_parse_usage_reads_details_and_deepseek_cache_fields() -> None:
    u = parse_usage({"prompt_tokens": 100, "completion_tokens": 50,
                     "prompt_tokens_details": {"cached_tokens": 30, "cache_write_tokens": 10},
                     "completion_tokens_details": {"reasoning_tokens": 20}})
    assert u == Usage(100, 50, cached_tokens=30, cache_write_tokens=10, reasoning_tokens=20)
    deepseek = parse_usage({"prompt_tokens": 10, "completion_tokens": 11, "prompt_tokens_details": {"cached_tokens": 0},
                            "prompt_cache_hit_tokens": 6, "prompt_cache_miss_tokens": 4})
    assert deepseek is not None and deepseek.cached_tokens == 6
    assert parse_usage(None) is None and parse_usage({"total_tokens": 3}) is None
    # A count that is not a whole number of tokens in bounds is a provider error (test_usage_bounds.py).
    with pytest.raises(InvalidUsage):
        parse_usage({"prompt_tokens": "9", "completion_tokens": 4, "prompt_tokens_details": None})


def _chunk(model: str, content: str | None, usage: Any = "absent", choices: bool = True) -> bytes:
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "model": model,
                            "choices": [{"index": 0, "delta": {"content": content}}] if choices else []}
    if usage != "absent":
        body["usage"] = usage
    return b"data: " + orjson.dumps(body)


def test_stream_meter_rewrites_model_and_drops_only_the_unasked_usage_chunk() -> None:
    meter = OPENAI.meter(TARGET, strip_usage=True)
    first = meter.feed(_chunk("gpt-4o-2024-08-06", 'say "hi"\\', usage=None))
    assert first is not None
    parsed = orjson.loads(sse_data(first))
    assert parsed["model"] == "acme/gpt" and "usage" not in parsed
    assert parsed["choices"][0]["delta"]["content"] == 'say "hi"\\'
    usage = {"prompt_tokens": 5, "completion_tokens": 2}
    assert meter.feed(_chunk("gpt-4o-2024-08-06", None, usage=usage, choices=False)) is None
    assert meter.usage() == Usage(5, 2)
    assert meter.feed(b"data: [DONE]") == b"data: [DONE]" and meter.done
    assert meter.text_bytes == len(orjson.dumps('say "hi"\\')) - 2  # escaped length, no quotes


def test_stream_meter_keeps_usage_when_asked_and_handles_spaced_json() -> None:
    meter = OPENAI.meter(TARGET, strip_usage=False)
    spaced = (b'data: {"id": "c", "model": "gpt-4o", "choices": [], '
              b'"usage": {"prompt_tokens": 3, "completion_tokens": 1}}')
    out = meter.feed(spaced)
    assert out is not None and orjson.loads(sse_data(out))["model"] == "acme/gpt"
    assert b'"usage"' in out and meter.usage() == Usage(3, 1)


def test_usage_on_a_choice_chunk_is_stripped_not_dropped() -> None:
    meter = OPENAI.meter(TARGET, strip_usage=True)
    out = meter.feed(_chunk("gpt-4o", "end", usage={"prompt_tokens": 1, "completion_tokens": 1}))
    assert out is not None
    parsed = orjson.loads(sse_data(out))
    assert "usage" not in parsed and parsed["choices"][0]["delta"]["content"] == "end"
    assert meter.usage() == Usage(1, 1)


def test_model_name_inside_text_is_not_rewritten() -> None:
    meter = OPENAI.meter(TARGET, strip_usage=False)
    first = meter.feed(_chunk("gpt-4o", "x"))
    out = meter.feed(_chunk("gpt-4o", '"model":"gpt-4o"'))
    assert first is not None and out is not None
    assert orjson.loads(sse_data(out))["choices"][0]["delta"]["content"] == '"model":"gpt-4o"'


def test_anthropic_stream_usage_is_cumulative_and_estimated_until_message_delta() -> None:
    adapter = AnthropicAdapter()
    target = Target("anthropic/sonnet", "claude-x", "claude", "https://api.anthropic.com", {})
    meter = adapter.meter(target, strip_usage=False)
    start = {"type": "message_start", "message": {"model": "claude-x-2025", "usage": {
        "input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 2}}}
    out = meter.feed(b"event: message_start\ndata: " + orjson.dumps(start))
    assert out is not None and out.startswith(b"event: message_start\n")
    assert orjson.loads(sse_data(out))["message"]["model"] == "anthropic/sonnet"
    partial = meter.usage()
    assert partial is not None and partial.estimated and partial.prompt_tokens == 16
    delta = (b'event: content_block_delta\ndata: '
             b'{"type":"content_block_delta","delta":{"type":"text_delta","text":"abcd"}}')
    meter.feed(delta)
    assert meter.text_bytes == 4
    for n in (5, 8):
        meter.feed(b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":%d}}' % n)
    assert meter.usage() == Usage(16, 8, cached_tokens=4, cache_write_tokens=2)
    meter.feed(b'event: message_stop\ndata: {"type":"message_stop"}')
    assert meter.done
    err = adapter.error_event(UpstreamTimeout("slow"))
    assert err.startswith(b"event: error\n") and orjson.loads(sse_data(err.strip()))["error"]["message"] == "slow"


def test_anthropic_urls_and_headers() -> None:
    assert messages_url("https://api.anthropic.com") == "https://api.anthropic.com/v1/messages"
    assert messages_url("https://api.anthropic.com/v1/") == "https://api.anthropic.com/v1/messages"
    cf = "https://gateway.ai.cloudflare.com/v1/acct/gw/anthropic"
    assert messages_url(cf) == cf + "/v1/messages"
    adapter = AnthropicAdapter()
    h = adapter.static_headers(ProviderConfig(type="anthropic", base_url=cf, api_key_env="K"), "sk-ant", None)
    assert h["x-api-key"] == "sk-ant" and "authorization" not in h
    req = adapter.prepare(Target("a", "claude-x", "p", cf, h), "messages", {"model": "a", "max_tokens": 1},
                          False, dict(h))
    assert req.headers["anthropic-version"] == "2023-06-01" and orjson.loads(req.body)["model"] == "claude-x"


def test_escaped_text_bytes_stops_at_the_closing_quote() -> None:
    ev = b'{"delta":{"content":"a\\\\"},"x":"tail"}'  # content is a single escaped backslash pair
    content = text_markers("content")
    assert escaped_text_bytes(ev, content) == 3
    assert escaped_text_bytes(b'{"content":"say \\"hi\\""}', content) == len(b'say \\"hi\\"')
    assert escaped_text_bytes(b'{"content":""}', content) == 0
    # Every marked value counts, whichever key and however many (parallel tool calls).
    calls = b'{"tool_calls":[{"function":{"arguments":"{\\"a\\":1}"}},{"function":{"arguments":"xy"}}]}'
    assert escaped_text_bytes(calls, text_markers("content", "arguments")) == len(b'{\\"a\\":1}') + 2


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"error":{"message":"bad","type":"invalid_request_error","code":"context_length_exceeded","param":"messages"}}',
     ("bad", "context_length_exceeded", "messages")),
    (b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}', ("busy", "overloaded_error", None)),
    (b'{"detail":"nope"}', ("nope", None, None)),
    (b'{"error":"plain"}', ("plain", None, None)),
    (b"<html>502 Bad Gateway</html>", ("<html>502 Bad Gateway</html>", None, None)),
    (b'{"error":{"message":"x","code":"has spaces in it"}}', ("x", None, None)),
])
def test_upstream_error_details_in_common_shapes(raw: bytes, expected: tuple[str, Any, Any]) -> None:
    assert upstream_error_details(raw) == expected


def test_prompt_estimate() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "12345678"},
                                       {"role": "user", "content": [{"type": "text", "text": "abcd"}]}]}
    # role strings + texts + part type: 4+8+4+4+4 = 24 bytes -> 6 tokens, + 4 per message
    assert estimate_prompt_tokens(body) == 6 + 8
    assert estimate_prompt_tokens({"input": [[1, 2, 3], [4]]}) == 4  # token ids count one each


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def chunks(resp: Any) -> list[bytes]:
    parts = []
    while part := await resp.chunk():
        parts.append(part)
    return parts


def test_echo_answers_streams_and_embeds_offline() -> None:
    echo = EchoTransport()
    body = {"model": "echo-1", "messages": [{"role": "user", "content": "hello there"}]}
    resp = run(echo.send(UpstreamRequest("/chat/completions", {}, orjson.dumps(body), False)))
    done = orjson.loads(run(resp.read(1 << 20)))
    assert done["choices"][0]["message"]["content"] == "hello there" and done["model"] == "echo-1"
    assert done["usage"]["completion_tokens"] == 3

    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 1}
    resp = run(echo.send(UpstreamRequest("/chat/completions", {}, orjson.dumps(streamed), True)))
    parts = run(chunks(resp))
    events = [orjson.loads(p[6:]) for p in parts[:-1]]
    assert parts[-1] == b"data: [DONE]\n\n" and events[-1]["usage"]["completion_tokens"] == 1
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "hell"

    emb = {"model": "e", "input": ["a", "b"], "encoding_format": "base64"}
    resp = run(echo.send(UpstreamRequest("/embeddings", {}, orjson.dumps(emb), False)))
    data = orjson.loads(run(resp.read(1 << 20)))["data"]
    assert len(data) == 2 and len(struct.unpack("<16f", base64.b64decode(data[0]["embedding"]))) == 16


def test_registry_covers_every_provider_type() -> None:
    from typing import get_args

    from tollway.config import ProviderType

    assert set(ADAPTERS) == set(get_args(ProviderType))
    assert ADAPTERS["echo"].in_process and not ADAPTERS["openai"].in_process
