"""The production surface, derived from the running config and the route table.

`tollway config check` prints it and the dashboard's security page renders it, so
neither can say anything the configuration does not do.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from typing import Any

from tollway.config import Config
from tollway.privacy import FORWARDED_REQUEST_HEADERS, LOGGABLE_FIELDS, NEVER_RECORDED, RETURNED_RESPONSE_HEADERS
from tollway.providers.responses import serves_responses
from tollway.route_table import ROUTE_TABLE


def _redact(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}{':***' if ':' in creds else ''}@{host}"


ADMIN_TOKEN_MIN_BYTES = 32  # 256 bits: a bearer token is as strong as its length


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def warnings(cfg: Config, host: str | None = None) -> list[str]:
    """What this configuration exposes that an operator should decide on purpose.
    `config check` prints these and `tollway serve` logs them once at start."""
    host = host or cfg.server.host
    found = []
    if cfg.metrics.enabled and not cfg.metrics.require_admin_token and not _loopback(host):
        found.append(f"/metrics is open to anyone who can reach {host}:{cfg.server.port}; set "
                     "metrics.require_admin_token = true, or metrics.enabled = false, or listen on loopback")
    token = os.environ.get(cfg.server.admin_token_env, "")
    if token and len(token.encode()) < ADMIN_TOKEN_MIN_BYTES:
        found.append(f"${cfg.server.admin_token_env} is {len(token.encode())} bytes; use at least "
                     f"{ADMIN_TOKEN_MIN_BYTES} random bytes (e.g. `openssl rand -hex 32`)")
    if cfg.metrics.require_admin_token and not token:
        found.append(f"metrics.require_admin_token is set but ${cfg.server.admin_token_env} is unset: "
                     "/metrics refuses every request")
    return found


def revocation_bound(cfg: Config) -> str:
    """How soon a revoked key stops working, in words: `config check` and /security say it."""
    ttl = cfg.cache.key_ttl_seconds
    if not cfg.auth.clerk:
        return ("immediate: a revoke returns only once no live worker will admit the key "
                f"(verified keys are cached at most {ttl} s)")
    events = ", ".join(cfg.auth.clerk_evict_events)
    signalled = (f"or signalled by a verified Clerk webhook event ({events}; user.deleted and "
                 "organization.deleted for all of a subject's keys)" if events else
                 "or a verified Clerk user.deleted / organization.deleted webhook (all of a subject's keys)")
    return (f"keys are issued by Clerk and verified through its Backend API, cached at most {ttl} s: "
            f"immediate for a revocation made through Tollway (dashboard, CLI, admin API) {signalled}; "
            f"a key revoked in Clerk by any other way stops working within {ttl} s")


def limits(cfg: Config) -> dict[str, int]:
    """The bounds against hostile clients and the drain on SIGTERM (serving.py), each worker's."""
    s = cfg.server
    return {"header_timeout_seconds": s.header_timeout_seconds, "body_timeout_seconds": s.body_timeout_seconds,
            "max_header_bytes": s.max_header_bytes, "keepalive_timeout_seconds": s.keepalive_timeout_seconds,
            "max_connections": s.max_connections, "max_streams_per_key": s.max_streams_per_key,
            "drain_timeout_seconds": s.drain_timeout_seconds}


def describe(cfg: Config) -> dict[str, Any]:
    admin_on = bool(os.environ.get(cfg.server.admin_token_env))
    return {
        "config_file": cfg.source,
        "listener": {"host": cfg.server.host, "port": cfg.server.port, "max_body_bytes": cfg.server.max_body_bytes},
        "limits": limits(cfg),
        "routes": [
            {"path": p, "methods": m, "purpose": d,
             "auth": "operator token" if p == "/metrics" and cfg.metrics.require_admin_token else a,
             **({"enabled": admin_on} if p.startswith("/admin") else {}),
             **({"enabled": cfg.stripe is not None} if p.startswith("/webhooks/stripe") else {}),
             **({"enabled": cfg.auth.clerk} if p.startswith("/webhooks/clerk") else {}),
             **({"enabled": cfg.metrics.enabled} if p == "/metrics" else {}),
             **({"enabled": cfg.dashboard is not None} if p.startswith("/dashboard") else {}),
             **({"enabled": cfg.security is not None} if p.startswith("/.well-known") else {})}
            for p, m, a, d in ROUTE_TABLE
        ],
        "providers": [
            {"name": p.name, "type": p.type, "base_url": p.base_url or "(served in-process)",
             "key_env": p.api_key_env or None, "extra_headers": sorted(p.extra_headers),
             "cloudflare_body_logging": "off (cf-aig-collect-log-payload: false)" if not p.cf_collect_log_payload
             else "provider default", "serves_responses_api": serves_responses(p)}
            for p in cfg.providers.values()
        ],
        "models": [
            {"id": m.id, "provider": m.provider, "upstream": m.upstream,
             "input_usd_per_mtok": str(m.input_usd_per_mtok), "output_usd_per_mtok": str(m.output_usd_per_mtok),
             "fallbacks": list(m.fallbacks)}
            for m in cfg.models
        ],
        "retries": {"attempts": cfg.server.retry_attempts, "backoff_ms": cfg.server.retry_backoff_ms,
                    "retry_after_cap_seconds": cfg.server.retry_after_cap_seconds},
        "environment_variables": [
            {"name": env, "purpose": purpose, "set": bool(os.environ.get(env))} for purpose, env in cfg.env_references()
        ],
        "storage": {"database": _redact(cfg.database.url), "cache": _redact(cfg.cache.url),
                    "key_cache_ttl_seconds": cfg.cache.key_ttl_seconds},
        "keys": {"issuer": cfg.auth.issuer, "revocation": revocation_bound(cfg),
                 **({"clerk_api_url": cfg.auth.clerk_api_url, "clerk_evict_events": list(cfg.auth.clerk_evict_events)}
                    if cfg.auth.clerk else {})},
        "retention": {"access_log_days": cfg.retention.access_log_days, "usage_and_ledger": "kept"},
        "rate_limits": {"requests_per_minute": cfg.limits.requests_per_minute,
                        "tokens_per_minute": cfg.limits.tokens_per_minute,
                        "counted_in": "memory (this process)" if cfg.cache.url == "memory://"
                        else "Redis (every worker), each worker's memory while Redis fails"},
        "attribution": {"header": cfg.attribution.header, "fields": ["tenant_id", "key_id", "request_id"]}
        if cfg.attribution else None,
        "logging": {"recorded_fields": sorted(LOGGABLE_FIELDS), "never_recorded": list(NEVER_RECORDED),
                    "headers_forwarded_upstream": sorted(FORWARDED_REQUEST_HEADERS),
                    "upstream_headers_returned": sorted(RETURNED_RESPONSE_HEADERS)},
        "dashboard": {"public_url": cfg.dashboard.public_url, "session_max_age_seconds":
                      cfg.dashboard.session_max_age_seconds, "session_secret_env": cfg.dashboard.session_secret_env,
                      "oidc_issuer": cfg.dashboard.oidc_issuer or None, "oidc_client_id": cfg.dashboard.oidc_client_id
                      or None, "oidc_client_secret_env": cfg.dashboard.oidc_client_secret_env
                      if cfg.dashboard.oidc_issuer else None} if cfg.dashboard else None,
        "security": dataclasses.asdict(cfg.security) if cfg.security else None,
        "payments": {"stripe": {"currency": cfg.stripe.currency, "api_base": cfg.stripe.api_base}}
        if cfg.stripe else None,
        "warnings": warnings(cfg),
    }


def _columns(rows: list[list[str]]) -> list[str]:
    """Rows as text, each column as wide as its longest value plus two spaces, so long
    values never run into the next column."""
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(len(rows[0]) - 1)] if rows else []
    return ["  " + "".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + r[-1] for r in rows]


def render_text(s: dict[str, Any]) -> str:
    lines = [f"config: {s['config_file']}  (valid)", "",
             f"listener  http://{s['listener']['host']}:{s['listener']['port']}  "
             f"(bodies up to {s['listener']['max_body_bytes']} bytes)"]
    lim = s["limits"]
    lines += [f"limits    each worker: {lim['max_connections']} connections; headers within "
              f"{lim['header_timeout_seconds']} s and {lim['max_header_bytes']} bytes, a body within "
              f"{lim['body_timeout_seconds']} s; idle keep-alive {lim['keepalive_timeout_seconds']} s; "
              f"{lim['max_streams_per_key']} streams per key",
              f"drain     on SIGTERM, requests in flight may finish for {lim['drain_timeout_seconds']} s", "",
              "routes"]
    off = {True: "", False: "  [off]"}
    lines += _columns([[r["methods"], r["path"], r["auth"], r["purpose"] + off[r.get("enabled", True)]]
                       for r in s["routes"]])
    lines += ["", "providers"]
    for p in s["providers"]:
        lines.append(f"  {p['name']:<14}{p['type']:<10}{p['base_url']}  key: ${p['key_env'] or '-'}"
                     + (f"  extra headers: {', '.join(p['extra_headers'])}" if p["extra_headers"] else "")
                     + ("  /v1/responses" if p["serves_responses_api"] else ""))
    lines += ["", "models"]
    for m in s["models"]:
        lines.append(f"  {m['id']:<32}-> {m['provider']}/{m['upstream']}  "
                     f"${m['input_usd_per_mtok']}/${m['output_usd_per_mtok']} per Mtok in/out"
                     + (f"  fallbacks: {', '.join(m['fallbacks'])}" if m["fallbacks"] else ""))
    r = s["retries"]
    lines.append(f"  retries: {r['attempts']} per model before its next fallback, from {r['backoff_ms']} ms "
                 f"doubling; provider retry-after honoured up to {r['retry_after_cap_seconds']} s")
    lines += ["", "environment variables (names only)"]
    lines += _columns([[e["name"], "set" if e["set"] else "unset", e["purpose"]] for e in s["environment_variables"]])
    st = s["storage"]
    lines += ["", f"storage   {st['database']}", f"cache     {st['cache']}  (verified keys kept "
              f"{st['key_cache_ttl_seconds']} s)",
              f"retention access log {s['retention']['access_log_days']} days; usage and ledger kept",
              f"keys      issued by {s['keys']['issuer']}; revocation: {s['keys']['revocation']}"]
    rl = s["rate_limits"]
    lines.append(f"rate limits per key (default; a key's own setting wins): "
                 f"{rl['requests_per_minute'] or 'unlimited'} requests/min, {rl['tokens_per_minute'] or 'unlimited'} "
                 f"tokens/min; counted in {rl['counted_in']}")
    if s["attribution"]:
        lines.append(f"attribution header {s['attribution']['header']}: {', '.join(s['attribution']['fields'])}")
    lg = s["logging"]
    lines += ["", "logged (metadata only): " + ", ".join(lg["recorded_fields"]),
              "never recorded: " + "; ".join(lg["never_recorded"])]
    d = s["dashboard"]
    lines += ["", f"dashboard {d['public_url']}/dashboard  sessions {d['session_max_age_seconds']} s, signed with "
              f"${d['session_secret_env']}; sign-in: " + (f"OIDC {d['oidc_issuer']} (client {d['oidc_client_id']}, "
              f"secret ${d['oidc_client_secret_env']}) and one-time links" if d["oidc_issuer"] else
              "one-time links (tollway dashboard-link)") if d else "dashboard off (no [dashboard] table)"]
    sec = s["security"]
    lines.append(f"security.txt contact {sec['contact']}, expires {sec['expires_days']} days ahead" if sec
                 else "security.txt off (no [security] table)")
    if s["warnings"]:
        lines += ["", "warnings"] + [f"  ! {w}" for w in s["warnings"]]
    return "\n".join(lines)
