"""THE allow-lists: what may be recorded, what may leave, what may come back.

Everything that writes a log line, a metric, a usage row or an error message takes its
fields through here. Prompt and completion text is never on any list, so it cannot be
recorded by accident: an unknown field is dropped, not passed on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# Fields that may appear in a log line, a usage row, an access-log row or an error report.
LOGGABLE_FIELDS: frozenset[str] = frozenset({
    "event", "level", "timestamp", "logger",
    "request_id", "tenant_id", "key_id", "model", "provider",
    "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "estimated",
    "cost_usd", "cost_micros", "latency_ms", "status", "error_type", "error_code", "stream",
    "method", "path", "client_ip", "worker_id", "count", "released", "notice", "host", "port",
    "exc_type", "exc_place", "upstream_status", "stripe_event_type", "stripe_event_id", "outcome",
    "clerk_operation", "clerk_event_type",
    "requested_model", "attempts",
})

# What is never recorded anywhere, stated for the security page and `config check`.
NEVER_RECORDED: tuple[str, ...] = (
    "prompts, system messages and tool arguments",
    "completions and embedding inputs or vectors",
    "customer API keys (only a keyed hash is stored)",
    "provider keys and every other secret",
    "request and response headers outside the allow-list",
)

# Client request headers that may be forwarded upstream (everything else is dropped:
# Authorization, x-api-key, cookies, x-forwarded-*, and any header carrying an ak_ key).
FORWARDED_REQUEST_HEADERS: frozenset[str] = frozenset({"content-type", "accept", "anthropic-version", "anthropic-beta"})

# Upstream response headers that may reach the client. Rate-limit and organisation
# headers describe the operator's provider account, so they stay behind.
RETURNED_RESPONSE_HEADERS: frozenset[str] = frozenset({"content-type", "retry-after", "retry-after-ms"})

_KEYLIKE = re.compile(
    r"(?i)("
    r"ak_[A-Za-z0-9_\-]{8,}"              # Tollway customer keys
    r"|sk-[A-Za-z0-9_\-]{8,}"             # OpenAI / DeepSeek / Anthropic style keys
    r"|gsk_[A-Za-z0-9]{8,}"               # Groq
    r"|xai-[A-Za-z0-9]{8,}"
    r"|bearer\s+[A-Za-z0-9._\-]{8,}"
    r"|[A-Za-z0-9_\-]{32,}"               # any long opaque token
    r")"
)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove anything key-like (and the given secrets, and any fragment of 8+ of their
    characters) from text that came from upstream before a client may see it."""
    for s in secrets:
        if s:
            text = text.replace(s, "[redacted]")
            # Providers echo partial keys ("sk-abc...wxyz"): drop any 8-char window of the key.
            for i in range(0, max(0, len(s) - 7)):
                frag = s[i:i + 8]
                if frag in text:
                    text = text.replace(frag, "[redacted]")
    return _KEYLIKE.sub("[redacted]", text)


def scrub_identifier(value: str | None, secrets: Iterable[str] = ()) -> str | None:
    """An upstream error's code or param, or None if scrub() would change any of it: these
    go to the client and into the log line whole, so a part cannot be masked."""
    return value if value is not None and scrub(value, secrets) == value else None


def loggable(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Only allow-listed fields survive; anything else is dropped (not masked)."""
    return {k: v for k, v in fields.items() if k in LOGGABLE_FIELDS}


def forwarded_headers(incoming: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in incoming:
        n = name.lower()
        if n in FORWARDED_REQUEST_HEADERS and "ak_" not in value:
            out[n] = value
    return out


def returned_headers(upstream: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {n.lower(): v for n, v in upstream if n.lower() in RETURNED_RESPONSE_HEADERS}


# Headers the HTTP client owns (hop-by-hop and message framing): set from config they
# would corrupt or smuggle the upstream request.
HOP_BY_HOP_HEADERS: frozenset[str] = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "host", "content-length", "content-encoding", "expect",
})
# Beyond those, what the per-customer metadata header (config: attribution.header) may not
# be: a credential (it would replace the provider key), a header Tollway sets or forwards,
# or a provider's own header (versions, beta features and their prices, accounts).
_NOT_METADATA = HOP_BY_HOP_HEADERS | FORWARDED_REQUEST_HEADERS | {
    "authorization", "proxy-authorization", "proxy-authenticate", "www-authenticate", "cookie", "set-cookie",
    "forwarded", "accept-encoding", "x-request-id"}
_NOT_METADATA_PREFIXES = ("anthropic-", "openai-", "cf-aig-", "x-forwarded-", "proxy-", "sec-")
_CREDENTIAL_WORD = re.compile(r"auth|api-?key|token|secret|password|cookie|session")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token


def metadata_header_problem(name: str) -> str | None:
    """Why `name` cannot carry per-customer metadata upstream, or None when it can."""
    if not _HEADER_NAME.fullmatch(name):
        return "expected an HTTP header name (letters, digits and -)"
    low = name.lower()
    if low == "cf-aig-metadata":  # Cloudflare AI Gateway's metadata header, the default
        return None
    if low in _NOT_METADATA or low.startswith(_NOT_METADATA_PREFIXES) or _CREDENTIAL_WORD.search(low):
        return (f"{name!r} is a hop-by-hop, credential or provider header; name a header of its own, "
                f"e.g. cf-aig-metadata or x-<yours>-metadata")
    return None
