"""The allow-lists in privacy.py: what may be recorded, forwarded and returned."""

from __future__ import annotations

from tollway import privacy
from tollway.privacy import forwarded_headers, loggable, returned_headers, scrub

CONTENT_WORDS = ("prompt", "message", "content", "input", "completion", "text", "argument", "tool", "body",
                 "header", "authorization", "key", "secret", "email", "name", "query", "url")


def test_loggable_keeps_only_allow_listed_fields() -> None:
    fields = {"request_id": "req_1", "tenant_id": "tn_1", "model": "m", "prompt": "hi", "messages": [1],
              "authorization": "Bearer ak_x", "input": "embed me", "cost_micros": 5}
    assert loggable(fields) == {"request_id": "req_1", "tenant_id": "tn_1", "model": "m", "cost_micros": 5}


def test_no_content_bearing_field_is_allow_listed() -> None:
    # key_id and the token counters are metadata; anything that names content is not.
    allowed_exceptions = {"key_id", "prompt_tokens", "completion_tokens"}
    for name in privacy.LOGGABLE_FIELDS - allowed_exceptions:
        assert not any(word in name for word in CONTENT_WORDS), name


def test_forwarded_headers_drop_credentials_and_unknown_headers() -> None:
    incoming = [("Authorization", "Bearer ak_abc"), ("x-api-key", "ak_abc"), ("Cookie", "s=1"),
                ("Content-Type", "application/json"), ("X-Forwarded-For", "10.0.0.1"), ("Accept", "ak_in_value"),
                ("anthropic-version", "2023-06-01")]
    assert forwarded_headers(incoming) == {"content-type": "application/json", "anthropic-version": "2023-06-01"}


def test_returned_headers_keep_only_the_allow_list() -> None:
    upstream = [("Content-Type", "application/json"), ("openai-organization", "org-secret"),
                ("x-ratelimit-remaining-tokens", "10"), ("Retry-After", "3")]
    assert returned_headers(upstream) == {"content-type": "application/json", "retry-after": "3"}


def test_scrub_removes_keys_and_fragments_of_secrets() -> None:
    secret = "sk-live-0123456789abcdefghij"
    text = f"Incorrect API key provided: sk-live-0123...ghij and {secret[4:16]} and ak_{'A' * 20}"
    out = scrub(text, [secret])
    assert secret[4:16] not in out and "ak_AAAA" not in out
    assert "Incorrect API key provided" in out
    assert scrub("no secrets here") == "no secrets here"
