"""OpenAI's Responses API wire format (POST /v1/responses) on `openai`-type providers.

Not every OpenAI-compatible vendor serves it, so a provider opts in with
`providers.NAME.responses_api` (config.md; `serves_responses`): "auto" means
api.openai.com only, and the in-process echo provider always serves it.

What differs from chat completions:
  * the output bound is `max_output_tokens` (reasoning included), written by
    inbound.shape; there is no `n`;
  * `store` is always sent as false: a stored response could be read back through
    `previous_response_id` by anyone on the operator's shared account (proxy/stored.py
    refuses the fields that read stored state);
  * usage comes in the final lifecycle event of a stream (`response.completed`, or
    `response.incomplete` / `response.failed`) as input_tokens, input_tokens_details.
    cached_tokens, output_tokens, output_tokens_details.reasoning_tokens; there is no
    `stream_options.include_usage` to ask for it and no `[DONE]`: that final event is
    the stream's end marker.

The meter parses only the lifecycle events, the ones that carry a `response` object
(a handful per stream: created, in_progress, then the final one), to put the slug back
in `response.model` and read the usage; deltas are passed on after a byte search.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import orjson

from tollway.config import ProviderConfig
from tollway.errors import TollwayError, render_sse
from tollway.money import Usage
from tollway.providers.base import (
    RESPONSES,
    InvalidUsage,
    Target,
    UpstreamRequest,
    count,
    escaped_text_bytes,
    join_url,
    sse_data,
    text_markers,
)
from tollway.providers.openai import OpenAIAdapter
from tollway.providers.tenant_tag import TenantTag

# Generated text reaches a client only in `delta`s (output text, reasoning summaries,
# function and custom tool arguments); the `.done` events and lifecycle events repeat it
# whole, so only deltas are counted for estimates.
_DELTA = text_markers("delta")
# A lifecycle event: its data holds a `response` object. A key inside a JSON string has its
# quotes escaped, so this cannot match generated text.
_LIFECYCLE = re.compile(rb'"response"\s*:\s*\{')
# The events that end a Responses stream; each carries the response's final usage.
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_OPENAI_HOSTS = frozenset({"api.openai.com"})


def serves_responses(provider: ProviderConfig) -> bool:
    """Whether /v1/responses is served for this provider's models (`responses_api`)."""
    if provider.type == "echo":
        return True
    if provider.type != "openai" or provider.responses_api == "off":
        return False
    return provider.responses_api == "on" or (urlsplit(provider.base_url).hostname or "") in _OPENAI_HOSTS


def parse_usage(u: Any) -> Usage | None:
    """A Responses usage object -> Usage (input_tokens include the cached ones, output_tokens
    the reasoning ones, as Usage counts them)."""
    if not isinstance(u, dict) or ("input_tokens" not in u and "output_tokens" not in u):
        return None
    inp = u.get("input_tokens_details")
    out = u.get("output_tokens_details")
    inp = inp if isinstance(inp, dict) else {}
    out = out if isinstance(out, dict) else {}
    return Usage(
        prompt_tokens=count(u.get("input_tokens"), "input_tokens"),
        completion_tokens=count(u.get("output_tokens"), "output_tokens"),
        cached_tokens=count(inp.get("cached_tokens"), "cached_tokens"),
        cache_write_tokens=count(inp.get("cache_write_tokens"), "cache_write_tokens"),
        reasoning_tokens=count(out.get("reasoning_tokens"), "reasoning_tokens"),
    )


_OPENAI = OpenAIAdapter()


class ResponsesAdapter:
    """Headers, tenant tags and error events as the OpenAI adapter; body, usage and stream
    of their own."""

    endpoints = frozenset({RESPONSES})
    in_process = False

    def static_headers(self, provider: ProviderConfig, key: str, cf_token: str | None) -> dict[str, str]:
        return _OPENAI.static_headers(provider, key, cf_token)

    def tag_tenant(self, endpoint: str, body: dict[str, Any], who: TenantTag, fields: str) -> None:
        _OPENAI.tag_tenant(endpoint, body, who, fields)

    def error_event(self, exc: TollwayError) -> bytes:
        return render_sse(exc)

    def prepare(self, target: Target, endpoint: str, body: dict[str, Any], stream: bool,
                headers: dict[str, str]) -> UpstreamRequest:
        body["model"] = target.upstream_model
        body["store"] = False  # OpenAI stores by default; proxy/stored.py says why never here
        return UpstreamRequest(join_url(target.base_url, "/responses"), headers, orjson.dumps(body), stream)

    def read_response(self, target: Target, body: dict[str, Any]) -> Usage | None:
        if "model" in body:
            body["model"] = target.slug
        return parse_usage(body.get("usage"))

    def meter(self, target: Target, strip_usage: bool) -> ResponsesStream:
        return ResponsesStream(target.slug)


class ResponsesStream:
    """Meters one Responses stream: byte searches on deltas, a parse per lifecycle event."""

    __slots__ = ("_slug", "_usage", "done", "invalid", "text_bytes")

    def __init__(self, slug: str) -> None:
        self._slug = slug
        self._usage: Usage | None = None
        self.done = False
        self.invalid: InvalidUsage | None = None
        self.text_bytes = 0

    def usage(self) -> Usage | None:
        return self._usage

    def feed(self, event: bytes) -> bytes | None:
        if _LIFECYCLE.search(event) is None:
            if b'"delta"' in event:
                self.text_bytes += escaped_text_bytes(event, _DELTA)
            return event
        try:
            data = orjson.loads(sse_data(event))
        except orjson.JSONDecodeError:
            return event
        if not isinstance(data, dict) or not isinstance(data.get("response"), dict):
            return event
        response = data["response"]
        if "model" in response:
            response["model"] = self._slug
        try:
            found = parse_usage(response.get("usage"))
        except InvalidUsage as exc:
            found, self.invalid = None, exc  # delivered as sent; the pipeline charges the reservation
        if found is not None:
            self._usage = found
        if data.get("type") in TERMINAL:
            self.done = True
        # The `event:` (and any `id:`) lines stay as they came; the data line is the patched one.
        head = b"".join(line + b"\n" for line in event.split(b"\n") if not line.startswith(b"data:"))
        return head + b"data: " + orjson.dumps(data)
