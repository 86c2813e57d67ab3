"""The adapter contract: pure functions between Tollway and one wire format.

An adapter never does I/O. It turns a parsed client request into an UpstreamRequest
(patched body bytes, allow-listed headers, URL), reads usage out of a response body,
and hands out a StreamMeter that rewrites and meters one SSE stream event by event.
Only proxy/upstream.py and proxy/relay.py touch the network.

Estimates. When an upstream reports no usage (stream cut by the client or the
provider, a broken provider), Tollway bills an estimate and marks the usage row
`estimated`: prompt = ceil(UTF-8 bytes of the request's text / 4) + 4 per message (the
chat template's role and separator tokens), plus one per token id sent as an integer;
completion = ceil(bytes of text delivered so far / 4), counted on the JSON-escaped text
(escapes make it a slight over-count for non-ASCII text). Four bytes per token is the
usual average of byte-level BPE tokenizers on English; no tokenizer is loaded because
the estimate must cost nothing on the hot path and be the same for every provider.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from tollway import __version__
from tollway.config import ProviderConfig
from tollway.errors import TollwayError, UpstreamError
from tollway.money import Usage
from tollway.providers.tenant_tag import TenantTag

USER_AGENT = f"tollway/{__version__}"
BYTES_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4

# Endpoint names used across the proxy: the /v1 path each one serves.
CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES = "chat", "completions", "embeddings", "messages"
RESPONSES = "responses"  # OpenAI's Responses API (providers/responses.py)


@dataclass(frozen=True, slots=True)
class Target:
    """One configured model, resolved once at start-up (the hot path does a dict lookup)."""

    slug: str
    upstream_model: str
    provider: str
    base_url: str
    headers: Mapping[str, str]  # static per provider: user agent, auth, extra and cf-aig headers
    output_field: str = "max_tokens"  # the chat field that carries the output bound (config.py)


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str]
    body: bytes
    stream: bool
    timeout: float | None = None  # seconds for this attempt in all; None: request_timeout_seconds


class UpstreamResponse(Protocol):
    """What a transport returns: the pooled HTTP client's response, or echo's."""

    status: int
    headers: list[tuple[str, str]]

    async def read(self, limit: int) -> bytes:
        """The whole body; an UpstreamError (upstream_invalid_response) past `limit` bytes."""
        ...

    async def chunk(self) -> bytes:
        """The next bytes of the body as they arrive; b"" at the end."""
        ...

    def at_end(self) -> bool:
        """The whole body has arrived and been read: `chunk` would return b""."""
        ...

    def close(self) -> None:
        """Drop the connection (a stream not read to its end is cancelled upstream)."""
        ...

    def release(self) -> None:
        """Return the connection to the pool after the body was read."""
        ...


class Transport(Protocol):
    async def send(self, request: UpstreamRequest) -> UpstreamResponse: ...


class StreamMeter(Protocol):
    """Rewrites and meters the events of one stream. `feed` returns the event to send
    on (model name restored) or None to drop it."""

    text_bytes: int  # JSON-escaped bytes of generated text seen so far (for estimates)
    done: bool  # the stream reached its normal end marker
    invalid: InvalidUsage | None  # the stream's usage report was refused (`count`)

    def feed(self, event: bytes) -> bytes | None: ...

    def usage(self) -> Usage | None: ...


class Adapter(Protocol):
    endpoints: frozenset[str]
    in_process: bool  # True: served inside Tollway (echo), no network

    def static_headers(self, provider: ProviderConfig, key: str, cf_token: str | None) -> dict[str, str]: ...

    def prepare(self, target: Target, endpoint: str, body: dict[str, Any], stream: bool,
                headers: dict[str, str]) -> UpstreamRequest: ...

    def read_response(self, target: Target, body: dict[str, Any]) -> Usage | None: ...

    def meter(self, target: Target, strip_usage: bool) -> StreamMeter: ...

    def error_event(self, exc: TollwayError) -> bytes: ...

    def tag_tenant(self, endpoint: str, body: dict[str, Any], who: TenantTag, fields: str) -> None:
        """Put the tenant's pseudonym in the fields that partition the provider's per-user
        state (tenant_tag.py); `fields` is the provider's resolved tenant_fields."""
        ...


def gateway_headers(provider: ProviderConfig, cf_token: str | None) -> dict[str, str]:
    """Headers every adapter sends: configured extras and the Cloudflare AI Gateway options."""
    out = {k.lower(): v for k, v in provider.extra_headers.items()}
    if not provider.cf_collect_log_payload:
        # Cloudflare logs bodies by default; this keeps metadata (tokens, cost) only.
        out["cf-aig-collect-log-payload"] = "false"
    if cf_token:
        out["cf-aig-authorization"] = f"Bearer {cf_token}"
    return out


def merge_headers(client: Mapping[str, str], static: Mapping[str, str],
                  per_request: Mapping[str, str]) -> dict[str, str]:
    """Client headers (already allow-listed) lose to the provider's, which lose to the
    per-request ones; the body is always JSON re-serialised by Tollway."""
    out = dict(client)
    out.update(static)
    out.update(per_request)
    out["content-type"] = "application/json"
    return out


def join_url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path


# --- usage helpers -------------------------------------------------------------------------


# The most one count of a provider's usage report may say: above any model's context or
# output by orders of magnitude, and small enough that no price, sum or column overflows
# with it (a count of 2^63 once stopped every journal flush and every restart).
MAX_TOKENS = 1_000_000_000


class InvalidUsage(UpstreamError):
    """A usage report with a count that is not a whole number of tokens in [0, MAX_TOKENS]:
    the request is charged its reservation (docs/proxy.md, "Usage a provider reports")."""

    def __init__(self, field: str) -> None:
        super().__init__(f"The model provider reported an invalid token count ({field}).",
                         code="upstream_invalid_usage")
        self.field = field


def count(value: Any, field: str = "usage") -> int:
    """A token count from an upstream body: absent (None) is 0; anything but an int in
    [0, MAX_TOKENS] (a bool, a float, a string, a negative or absurd number) raises InvalidUsage."""
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value <= MAX_TOKENS:
        raise InvalidUsage(field)
    return value


def tokens_from_bytes(n: int) -> int:
    return -(-n // BYTES_PER_TOKEN)


_TEXT_FIELDS = ("messages", "prompt", "input", "instructions", "system", "tools", "functions", "suffix")


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """The documented prompt estimate (module docstring) for any of the endpoints."""
    text_bytes = 0
    ids = 0
    stack: list[Any] = [body.get(k) for k in _TEXT_FIELDS]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            text_bytes += len(v.encode())
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            ids += 1  # a token id (embeddings and completions accept token arrays)
    messages = body.get("messages")
    per_message = TOKENS_PER_MESSAGE * len(messages) if isinstance(messages, list) else 0
    return tokens_from_bytes(text_bytes) + ids + per_message


def text_bytes_of(value: Any, keys: frozenset[str]) -> int:
    """Bytes of every string found under one of `keys`, anywhere in a response body."""
    total = 0
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                if k in keys and isinstance(item, str):
                    total += len(item.encode())
                elif isinstance(item, dict | list):
                    stack.append(item)
        elif isinstance(v, list):
            stack.extend(v)
    return total


def text_markers(*keys: str) -> re.Pattern[bytes]:
    """What `escaped_text_bytes` looks for: `"<key>":"` for any of `keys`."""
    return re.compile(b'"(?:' + b"|".join(re.escape(k.encode()) for k in keys) + b')":"')


def escaped_text_bytes(event: bytes, markers: re.Pattern[bytes]) -> int:
    """Length of the JSON string values after every marker (text_markers: `"content":"`,
    ...), found with one regex pass and byte searches: no JSON parse per streamed chunk.
    Quotes inside a JSON string are escaped, so a marker can only match structure,
    never text."""
    total = 0
    for m in markers.finditer(event):
        start = m.end()
        j = event.find(b'"', start)
        while j > 0 and _escaped(event, j):
            j = event.find(b'"', j + 1)
        if j > start:
            total += j - start
    return total


def _escaped(buf: bytes, quote: int) -> bool:
    n = 0
    k = quote - 1
    while k >= 0 and buf[k] == 0x5C:  # backslash
        n += 1
        k -= 1
    return n % 2 == 1


def sse_data(event: bytes) -> bytes:
    """The data payload of one SSE event (data lines joined, per the SSE spec)."""
    if event.startswith(b"data:") and b"\n" not in event:
        return event[5:].strip()
    return b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))


def upstream_error_details(raw: bytes) -> tuple[str, str | None, str | None]:
    """(message, code, param) from an upstream error body in any common shape: OpenAI
    {"error": {...}}, Anthropic {"type": "error", "error": {...}}, {"detail": ...},
    {"message": ...} or plain text. The caller scrubs the message before use."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", "replace").strip()
        return (text[:500] or "no details"), None, None
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, str):
        return err[:500], None, None
    if not isinstance(err, dict):
        return "no details", None, None
    message = err.get("message") or err.get("detail") or err.get("msg") or "no details"
    if not isinstance(message, str):
        message = orjson.dumps(message).decode()
    code = err.get("code") or err.get("type")
    param = err.get("param")
    return (message[:500], _identifier(code), _identifier(param))


def _identifier(value: Any) -> str | None:
    """Pass an upstream code or param on only if it looks like an identifier."""
    if isinstance(value, str) and 0 < len(value) <= 64 and value.replace("_", "").replace(".", "").isalnum():
        return value
    return None
