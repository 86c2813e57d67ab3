"""The Anthropic Messages wire format (POST /v1/messages).

Metering follows integrations.md 4.1: cache reads and cache writes are reported apart
from input_tokens (the opposite of OpenAI), each priced on its own; in a stream the
final message_delta usage is cumulative and wins, message_start fills what it lacks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson

from tollway.config import ProviderConfig
from tollway.errors import TollwayError, render_anthropic_sse
from tollway.money import Usage
from tollway.providers.base import (
    MESSAGES,
    USER_AGENT,
    InvalidUsage,
    Target,
    UpstreamRequest,
    count,
    escaped_text_bytes,
    gateway_headers,
    sse_data,
    text_markers,
)
from tollway.providers.tenant_tag import TenantTag

DEFAULT_VERSION = "2023-06-01"
_USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_TEXT_MARKERS = text_markers("text", "thinking", "partial_json")


def messages_url(base_url: str) -> str:
    """Accept both https://api.anthropic.com and .../v1 (and Cloudflare's .../anthropic)."""
    base = base_url.rstrip("/")
    return base + ("/messages" if base.endswith("/v1") else "/v1/messages")


def to_usage(u: dict[str, Any]) -> Usage:
    cache_read = count(u.get("cache_read_input_tokens"), "cache_read_input_tokens")
    cache_write = count(u.get("cache_creation_input_tokens"), "cache_creation_input_tokens")
    return Usage(
        prompt_tokens=count(u.get("input_tokens"), "input_tokens") + cache_read + cache_write,
        completion_tokens=count(u.get("output_tokens"), "output_tokens"),
        cached_tokens=cache_read,
        cache_write_tokens=cache_write,
    )


class AnthropicAdapter:
    endpoints = frozenset({MESSAGES})
    in_process = False

    def static_headers(self, provider: ProviderConfig, key: str, cf_token: str | None) -> dict[str, str]:
        headers = gateway_headers(provider, cf_token)
        headers["user-agent"] = USER_AGENT
        headers["x-api-key"] = key
        return headers

    def prepare(self, target: Target, endpoint: str, body: dict[str, Any], stream: bool,
                headers: dict[str, str]) -> UpstreamRequest:
        body["model"] = target.upstream_model
        headers.setdefault("anthropic-version", DEFAULT_VERSION)
        return UpstreamRequest(messages_url(target.base_url), headers, orjson.dumps(body), stream)

    def read_response(self, target: Target, body: dict[str, Any]) -> Usage | None:
        if "model" in body:
            body["model"] = target.slug
        u = body.get("usage")
        return to_usage(u) if isinstance(u, dict) else None

    def meter(self, target: Target, strip_usage: bool) -> AnthropicStream:
        return AnthropicStream(target.slug)

    def tag_tenant(self, endpoint: str, body: dict[str, Any], who: TenantTag, fields: str) -> None:
        meta = body.get("metadata")
        if isinstance(meta, dict) and meta.get("user_id") is not None:
            meta["user_id"] = who.of(meta["user_id"])
        elif fields != "none" and (meta is None or isinstance(meta, dict)):
            body["metadata"] = {**(meta or {}), "user_id": who.tag}

    def error_event(self, exc: TollwayError) -> bytes:
        return render_anthropic_sse(exc)


class AnthropicStream:
    """Parses only message_start and message_delta events (a handful per stream)."""

    __slots__ = ("_counts", "_final", "_seen", "_slug", "done", "invalid", "text_bytes")

    def __init__(self, slug: str) -> None:
        self._slug = slug
        self._counts: dict[str, int] = {}
        self._seen = False
        self._final = False  # a message_delta arrived: output_tokens is the real total
        self.done = False
        self.invalid: InvalidUsage | None = None
        self.text_bytes = 0

    def usage(self) -> Usage | None:
        """None before message_start; flagged estimated until a message_delta gives the
        output total (the pipeline then estimates output from the text delivered)."""
        if not self._seen:
            return None
        usage = to_usage(self._counts)
        return usage if self._final else replace(usage, estimated=True)

    def feed(self, event: bytes) -> bytes | None:
        if b'"content_block_delta"' in event:
            self.text_bytes += escaped_text_bytes(event, _TEXT_MARKERS)
        elif b'"message_start"' in event:
            return self._start(event)
        elif b'"message_delta"' in event:
            self._delta(event)
        elif b'"message_stop"' in event:
            self.done = True
        return event

    def _parse(self, event: bytes) -> dict[str, Any] | None:
        try:
            data = orjson.loads(sse_data(event))
        except orjson.JSONDecodeError:
            return None
        return data if isinstance(data, dict) else None

    def _take(self, u: Any) -> None:
        if isinstance(u, dict):
            for field in _USAGE_FIELDS:
                if field in u:
                    try:
                        self._counts[field] = count(u[field], field)  # running totals: replace, never add
                    except InvalidUsage as exc:
                        self.invalid = exc  # the stream goes on; the pipeline charges the reservation
            self._seen = True

    def _start(self, event: bytes) -> bytes:
        data = self._parse(event)
        message = data.get("message") if data else None
        if data is None or not isinstance(message, dict):
            return event
        self._take(message.get("usage"))
        if "model" in message:
            message["model"] = self._slug
        head = b"event: message_start\n" if event.startswith(b"event:") else b""
        return head + b"data: " + orjson.dumps(data)

    def _delta(self, event: bytes) -> None:
        data = self._parse(event)
        if data is not None and isinstance(data.get("usage"), dict):
            self._take(data["usage"])
            self._final = True
