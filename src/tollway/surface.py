"""The production surface, derived from the running config and the route table.

`tollway config check` prints it and the dashboard's security page renders it, so
neither can say anything the configuration does not do.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from tollway.config import Config
from tollway.privacy import FORWARDED_REQUEST_HEADERS, LOGGABLE_FIELDS, NEVER_RECORDED, RETURNED_RESPONSE_HEADERS


def _redact(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}{':***' if ':' in creds else ''}@{host}"


def describe(cfg: Config) -> dict[str, Any]:
    from tollway.app import ROUTE_TABLE

    admin_on = bool(os.environ.get(cfg.server.admin_token_env))
    return {
        "config_file": cfg.source,
        "listener": {"host": cfg.server.host, "port": cfg.server.port, "max_body_bytes": cfg.server.max_body_bytes},
        "routes": [
            {"path": p, "methods": m, "auth": a, "purpose": d,
             **({"enabled": admin_on} if p.startswith("/admin") else {}),
             **({"enabled": cfg.stripe is not None} if p.startswith("/webhooks/stripe") else {}),
             **({"enabled": cfg.metrics.enabled} if p == "/metrics" else {}),
             **({"enabled": cfg.dashboard is not None} if p.startswith("/dashboard") else {}),
             **({"enabled": cfg.security is not None} if p.startswith("/.well-known") else {})}
            for p, m, a, d in ROUTE_TABLE
        ],
        "providers": [
            {"name": p.name, "type": p.type, "base_url": p.base_url or "(served in-process)",
             "key_env": p.api_key_env or None, "extra_headers": sorted(p.extra_headers),
             "cloudflare_body_logging": "off (cf-aig-collect-log-payload: false)" if not p.cf_collect_log_payload
             else "provider default"}
            for p in cfg.providers.values()
        ],
        "models": [
            {"id": m.id, "provider": m.provider, "upstream": m.upstream,
             "input_usd_per_mtok": str(m.input_usd_per_mtok), "output_usd_per_mtok": str(m.output_usd_per_mtok)}
            for m in cfg.models
        ],
        "environment_variables": [
            {"name": env, "purpose": purpose, "set": bool(os.environ.get(env))} for purpose, env in cfg.env_references()
        ],
        "storage": {"database": _redact(cfg.database.url), "cache": _redact(cfg.cache.url),
                    "key_cache_ttl_seconds": cfg.cache.key_ttl_seconds},
        "retention": {"access_log_days": cfg.retention.access_log_days, "usage_and_ledger": "kept"},
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
    }


def render_text(s: dict[str, Any]) -> str:
    lines = [f"config: {s['config_file']}  (valid)", "",
             f"listener  http://{s['listener']['host']}:{s['listener']['port']}  "
             f"(bodies up to {s['listener']['max_body_bytes']} bytes)", "", "routes"]
    for r in s["routes"]:
        state = "" if r.get("enabled", True) else "  [off]"
        lines.append(f"  {r['methods']:<9}{r['path']:<24}{r['auth']:<22}{r['purpose']}{state}")
    lines += ["", "providers"]
    for p in s["providers"]:
        lines.append(f"  {p['name']:<14}{p['type']:<10}{p['base_url']}  key: ${p['key_env'] or '-'}"
                     + (f"  extra headers: {', '.join(p['extra_headers'])}" if p["extra_headers"] else ""))
    lines += ["", "models"]
    for m in s["models"]:
        lines.append(f"  {m['id']:<32}-> {m['provider']}/{m['upstream']}  "
                     f"${m['input_usd_per_mtok']}/${m['output_usd_per_mtok']} per Mtok in/out")
    lines += ["", "environment variables (names only)"]
    for e in s["environment_variables"]:
        lines.append(f"  {e['name']:<28}{'set' if e['set'] else 'unset':<7}{e['purpose']}")
    st = s["storage"]
    lines += ["", f"storage   {st['database']}", f"cache     {st['cache']}  (verified keys kept "
              f"{st['key_cache_ttl_seconds']} s)",
              f"retention access log {s['retention']['access_log_days']} days; usage and ledger kept"]
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
    return "\n".join(lines)
