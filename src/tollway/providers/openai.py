"""The OpenAI wire format: OpenAI, DeepSeek, Groq, Together, Mistral, Fireworks,
OpenRouter, xAI and Cloudflare AI Gateway differ only by configuration (base_url, key
variable, extra headers), so one adapter serves them all.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from tollway.config import ProviderConfig
from tollway.errors import TollwayError, render_sse
from tollway.money import Usage
from tollway.providers.base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    USER_AGENT,
    InvalidUsage,
    Target,
    UpstreamRequest,
    count,
    escaped_text_bytes,
    gateway_headers,
    join_url,
    sse_data,
    text_markers,
)
from tollway.providers.tenant_tag import TenantTag

PATHS = {CHAT: "/chat/completions", COMPLETIONS: "/completions", EMBEDDINGS: "/embeddings"}

# Fields holding generated text in chunks: chat content, reasoning (DeepSeek's
# reasoning_content, OpenRouter's reasoning), tool-call arguments, legacy completions.
_TEXT_MARKERS = text_markers("content", "reasoning_content", "reasoning", "arguments", "text")
_MODEL = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
_DONE = (b"data: [DONE]", b"data:[DONE]")
# What the client may send and what OpenAI takes per endpoint (tenant_tag.py).
_TENANT_FIELDS = ("prompt_cache_key", "safety_identifier", "user")
_TAGGED = {CHAT: ("prompt_cache_key", "safety_identifier"), COMPLETIONS: ("user",), EMBEDDINGS: ("user",),
           RESPONSES: ("prompt_cache_key", "safety_identifier")}


def parse_usage(u: Any) -> Usage | None:
    """An OpenAI-style usage object -> Usage. DeepSeek's prompt_cache_hit_tokens is
    preferred over cached_tokens (integrations.md 4.2)."""
    if not isinstance(u, dict) or ("prompt_tokens" not in u and "completion_tokens" not in u):
        return None
    pd = u.get("prompt_tokens_details")
    cd = u.get("completion_tokens_details")
    pd = pd if isinstance(pd, dict) else {}
    cd = cd if isinstance(cd, dict) else {}
    cached = (count(u["prompt_cache_hit_tokens"], "prompt_cache_hit_tokens") if "prompt_cache_hit_tokens" in u
              else count(pd.get("cached_tokens"), "cached_tokens"))
    return Usage(
        prompt_tokens=count(u.get("prompt_tokens"), "prompt_tokens"),
        completion_tokens=count(u.get("completion_tokens"), "completion_tokens"),
        cached_tokens=cached,
        cache_write_tokens=count(pd.get("cache_write_tokens"), "cache_write_tokens"),
        reasoning_tokens=count(cd.get("reasoning_tokens"), "reasoning_tokens"),
    )


def usage_of(chunk: dict[str, Any]) -> Usage | None:
    """Usage of a body or chunk: the top-level field, else Groq's x_groq.usage."""
    found = parse_usage(chunk.get("usage"))
    if found is None:
        groq = chunk.get("x_groq")
        found = parse_usage(groq.get("usage")) if isinstance(groq, dict) else None
    return found


class OpenAIAdapter:
    endpoints = frozenset(PATHS)
    in_process = False

    def static_headers(self, provider: ProviderConfig, key: str, cf_token: str | None) -> dict[str, str]:
        headers = gateway_headers(provider, cf_token)
        headers["user-agent"] = USER_AGENT
        headers["authorization"] = f"Bearer {key}"
        return headers

    def prepare(self, target: Target, endpoint: str, body: dict[str, Any], stream: bool,
                headers: dict[str, str]) -> UpstreamRequest:
        body["model"] = target.upstream_model
        if stream:
            # Always ask for usage: a stream without it would be billed as an estimate.
            opts = body.get("stream_options")
            body["stream_options"] = {**opts, "include_usage": True} if isinstance(opts, dict) else {
                "include_usage": True}
        return UpstreamRequest(join_url(target.base_url, PATHS[endpoint]), headers, orjson.dumps(body), stream)

    def read_response(self, target: Target, body: dict[str, Any]) -> Usage | None:
        if "model" in body:
            body["model"] = target.slug
        return usage_of(body)

    def meter(self, target: Target, strip_usage: bool) -> OpenAIStream:
        return OpenAIStream(target.slug, strip_usage)

    def error_event(self, exc: TollwayError) -> bytes:
        return render_sse(exc)

    def tag_tenant(self, endpoint: str, body: dict[str, Any], who: TenantTag, fields: str) -> None:
        for name in _TENANT_FIELDS:
            if body.get(name) is not None:
                body[name] = who.of(body[name])
        for name in _TAGGED[endpoint] if fields == "openai" else ("user",) if fields == "user" else ():
            if body.get(name) is None:  # an explicit null would opt out of the partition
                body[name] = who.tag


class OpenAIStream:
    """Meters one chat/completions stream with byte searches; a chunk is parsed only
    when it carries a usage object (normally once per stream)."""

    __slots__ = ("_learned", "_slug_field", "_strip", "_usage", "done", "invalid", "text_bytes")

    def __init__(self, slug: str, strip_usage: bool) -> None:
        self._slug_field = b'"model":' + orjson.dumps(slug)
        self._learned: bytes | None = None  # the upstream's exact `"model":"..."` bytes
        self._strip = strip_usage  # the client did not ask for include_usage
        self._usage: Usage | None = None
        self.done = False
        self.invalid: InvalidUsage | None = None
        self.text_bytes = 0

    def usage(self) -> Usage | None:
        return self._usage

    def feed(self, event: bytes) -> bytes | None:
        if event.startswith(_DONE):
            self.done = True
            return event
        learned = self._learned
        # bytes.replace returns the same object when nothing matched: one scan, not two.
        out = event.replace(learned, self._slug_field, 1) if learned is not None else event
        if out is event:
            m = _MODEL.search(event)
            if m is not None:
                self._learned = m.group(0)
                out = event[:m.start()] + self._slug_field + event[m.end():]
        event = out
        self.text_bytes += escaped_text_bytes(event, _TEXT_MARKERS)
        i = event.find(b'"usage":')
        if i < 0:
            return event
        if event.startswith(b"null", i + 8) and b'"x_groq"' not in event:
            # The common case: every chunk but the last says "usage":null once usage was
            # asked for; the client that did not ask gets chunks as it would have.
            return event.replace(b',"usage":null', b"", 1) if self._strip else event
        return self._usage_event(event)

    def _usage_event(self, event: bytes) -> bytes | None:
        try:
            chunk = orjson.loads(sse_data(event))
        except orjson.JSONDecodeError:
            return event
        if not isinstance(chunk, dict):
            return event
        try:
            found = usage_of(chunk)
        except InvalidUsage as exc:
            found, self.invalid = None, exc  # the stream goes on; the pipeline charges the reservation
        if found is not None:
            self._usage = found
        if not self._strip or "usage" not in chunk:
            return event
        if not chunk.get("choices"):
            return None  # the extra usage chunk the client never asked for
        # Usage arrived on a chunk that also carries choices: keep the choices.
        del chunk["usage"]
        return b"data: " + orjson.dumps(chunk)
