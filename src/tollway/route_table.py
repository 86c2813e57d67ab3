"""ROUTE_TABLE: the one literal list of everything the gateway answers (path, methods,
who may call it, what it is for).

`tollway config check` and the public security page print it (surface.py), and a test
checks that the app serves exactly it. Data only, so those readers need not import the app.
"""

from __future__ import annotations

ROUTE_TABLE: list[tuple[str, str, str, str]] = [
    ("/healthz", "GET", "anyone", "process is up"),
    ("/readyz", "GET", "anyone", "storage reachable and migrations current"),
    ("/v1/models", "GET", "customer key", "configured models (OpenAI list format)"),
    ("/v1/models/{model:path}", "GET", "customer key", "one configured model"),
    ("/v1/chat/completions", "POST", "customer key", "chat completions, streaming and not"),
    ("/v1/completions", "POST", "customer key", "legacy text completions"),
    ("/v1/embeddings", "POST", "customer key", "embeddings"),
    ("/v1/messages", "POST", "customer key", "Anthropic Messages API"),
    ("/v1/messages/count_tokens", "POST", "customer key", "Anthropic token counting (not billed)"),
    ("/v1/responses", "POST", "customer key", "OpenAI Responses API, streaming and not (stateless)"),
    ("/admin/*", "GET,POST,PATCH,DELETE", "operator token", "operator API (off unless the token env var is set)"),
    ("/metrics", "GET", "anyone on the listener", "Prometheus metrics (no tenant or content labels)"),
    ("/webhooks/stripe", "POST", "Stripe signature", "wallet top-ups from Stripe Checkout"),
    ("/webhooks/clerk", "POST", "Svix signature (Clerk)", "Clerk events: evict keys, delete a deleted user's tenant "
     "(only with auth.issuer = \"clerk\")"),
    ("/dashboard/*", "GET,POST", "customer session", "customer dashboard: keys, wallet, usage, privacy"),
    ("/security", "GET", "anyone", "security page generated from this configuration"),
    ("/.well-known/security.txt", "GET", "anyone", "vulnerability contact (RFC 9116)"),
]
