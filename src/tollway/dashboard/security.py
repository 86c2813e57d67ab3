"""The public security page and /.well-known/security.txt, generated from the running
configuration and the code's own allow-lists, so neither can say what the gateway does
not do. Every claim names the test in this repository that proves it
(tests/test_dashboard_security.py checks that each named test exists).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from tollway.config import Config, SecurityConfig
from tollway.privacy import FORWARDED_REQUEST_HEADERS, LOGGABLE_FIELDS, NEVER_RECORDED, RETURNED_RESPONSE_HEADERS
from tollway.surface import describe, revocation_bound

from .web import Web


@dataclass(frozen=True)
class Claim:
    section: str
    title: str
    text: str
    items: tuple[str, ...]
    proofs: tuple[str, ...]   # "tests/test_x.py::test_name"


def claims(cfg: Config) -> list[Claim]:
    ttl = cfg.cache.key_ttl_seconds
    shared = not cfg.cache.url.startswith("memory")
    db = "SQLite, a file on the gateway's own host" if cfg.database.url.startswith("sqlite") else "PostgreSQL"
    out = [
        Claim("Logs", "What is logged", "Each log line, usage row and access-log row holds only these metadata "
              "fields; anything else is dropped before it is written.", tuple(sorted(LOGGABLE_FIELDS)),
              ("tests/test_privacy.py::test_loggable_keeps_only_allow_listed_fields",
               "tests/test_telemetry.py::test_log_lines_are_json_with_allow_listed_fields_only")),
        Claim("Logs", "What is never logged", "A request carrying a unique marker in every field is traced "
              "through logs, database and metrics; the marker appears nowhere.", NEVER_RECORDED,
              ("tests/test_canary.py::test_canary_appears_nowhere",
               "tests/test_privacy.py::test_no_content_bearing_field_is_allow_listed")),
        Claim("Retention", "Access log", f"Access-log rows (time, route, status, client address) are deleted "
              f"after {cfg.retention.access_log_days} days.", (),
              ("tests/test_retention.py::test_purge_removes_exactly_the_rows_past_retention",
               "tests/test_retention.py::test_serving_process_starts_the_periodic_purge")),
        Claim("Retention", "Usage and ledger", "Usage and ledger rows are kept for the accounts. Deleting an "
              "account erases name, email, keys and client addresses, and moves the books to a fresh "
              "pseudonym that nothing links back to the person.", (),
              ("tests/test_tenants.py::test_delete_erases_the_person_and_keeps_the_books",
               "tests/test_tenants.py::test_export_holds_profile_keys_ledger_usage")),
        Claim("Providers", "What reaches a provider", "Only these request headers of yours are forwarded; your "
              "API key never is. The provider's key is added by the gateway and never returned.",
              tuple(sorted(FORWARDED_REQUEST_HEADERS)),
              ("tests/test_privacy.py::test_forwarded_headers_drop_credentials_and_unknown_headers",
               "tests/test_proxy.py::test_key_custody_and_attribution_upstream",
               "tests/test_proxy.py::test_upstream_errors_are_mapped_and_never_leak_the_provider_key")),
        Claim("Providers", "What comes back", "Only these provider response headers reach you (rate-limit and "
              "organisation headers describe the operator's account and stay behind).",
              tuple(sorted(RETURNED_RESPONSE_HEADERS)),
              ("tests/test_proxy.py::test_upstream_response_headers_are_allow_listed",)),
        Claim("Keys", "Keys at rest", "API keys are stored only as an HMAC-SHA256 under a server secret, with a "
              "7-character display prefix; a copy of the database cannot use or test a key.", (),
              ("tests/test_keys.py::test_key_format_and_what_is_stored",
               "tests/test_keys.py::test_sqlite_file_never_contains_the_key_text")),
        Claim("Keys", "Revocation", f"A verified key is cached for at most {ttl} s"
              f"{' in Redis and in each worker' if shared else ' in the serving process'}; revoking a key "
              "returns only once no live worker will admit it, so the next request is refused.", (),
              ("tests/test_keys.py::test_revoke_returns_only_once_the_next_request_is_refused",
               "tests/test_workers.py::test_revoke_waits_until_every_live_worker_has_evicted"))
        if not cfg.auth.clerk else
        Claim("Keys", "Revocation", "API keys are issued by Clerk. " + revocation_bound(cfg)[0].upper()
              + revocation_bound(cfg)[1:] + ".", (),
              ("tests/test_clerk.py::test_signed_webhook_evicts_a_cached_key_at_once",
               "tests/test_clerk_scaleout.py::test_webhook_eviction_reaches_all_4_workers")),
        Claim("Money", "Where keys and money live", f"Accounts, keys and the ledger are stored in {db}; the key "
              f"cache is {'Redis' if shared else 'in-process memory'}. Every balance change is an append-only "
              "ledger entry, and concurrent requests cannot spend past the balance.", (),
              ("tests/test_ledger.py::test_200_concurrent_requests_against_a_wallet_covering_20",
               "tests/test_ledger.py::test_ten_replays_of_a_settle_charge_once")),
        Claim("Money", "Payments", "Card details stay with Stripe. A wallet is credited only by a Stripe webhook "
              "whose signature verifies, and only once per payment; the return page credits nothing."
              if cfg.stripe else "Top-ups by card are off on this gateway.", (),
              ("tests/test_stripe.py::test_forged_stale_or_missing_signatures_are_400_and_change_nothing",
               "tests/test_stripe.py::test_same_event_ten_times_credits_once")),
        Claim("Dashboard", "Sessions and pages", "Sign-in is delegated to an identity provider or a one-time "
              "link; sessions are signed, Secure, HttpOnly, SameSite=Lax cookies; every form carries a CSRF "
              "token; every page forbids framing and inline script.", (),
              ("tests/test_dashboard.py::test_every_post_without_csrf_is_403_and_changes_nothing",
               "tests/test_dashboard.py::test_every_page_has_the_security_headers",
               "tests/test_dashboard.py::test_another_tenants_ids_are_404_in_urls_and_forms")),
    ]
    for p in cfg.providers.values():
        used = any(m.provider == p.name for m in cfg.models)
        if not used:
            continue
        where = ("Served inside the gateway itself: no request leaves it." if p.type == "echo"
                 else f"Contacted at {p.base_url}.")
        sent = [f"attribution header {cfg.attribution.header}: account, key and request ids" if cfg.attribution
                else "no attribution header",
                "cf-aig-collect-log-payload: false (Cloudflare keeps no bodies)" if not p.cf_collect_log_payload
                else "no cf-aig-collect-log-payload header (the provider's default logging applies)"]
        out.append(Claim("Providers", f"Provider {p.name}", where, tuple(sent),
                         ("tests/test_proxy.py::test_key_custody_and_attribution_upstream",
                          "tests/test_proxy.py::test_no_attribution_header_unless_configured")))
    return out


def security_txt(sec: SecurityConfig, now: datetime | None = None) -> str:
    """RFC 9116: Contact and Expires always; the optional fields when configured."""
    expires = (now or datetime.now(UTC)) + timedelta(days=sec.expires_days)
    lines = [f"Contact: {sec.contact}", f"Expires: {expires.strftime('%Y-%m-%dT%H:%M:%SZ')}"]
    if sec.preferred_languages:
        lines.append(f"Preferred-Languages: {sec.preferred_languages}")
    if sec.policy:
        lines.append(f"Policy: {sec.policy}")
    if sec.canonical:
        lines.append(f"Canonical: {sec.canonical}")
    return "\n".join(lines) + "\n"


class SecurityPage:
    def __init__(self, web: Web, cfg: Config) -> None:
        self.web = web
        self.cfg = cfg
        self.claims = claims(cfg)  # the running config: a restart with another config changes the page
        self.routes = [r for r in describe(cfg)["routes"] if r.get("enabled", True)]  # the surface, live

    async def page(self, request: Request) -> Response:
        sections: dict[str, list[Claim]] = {}
        for c in self.claims:
            sections.setdefault(c.section, []).append(c)
        contact = self.cfg.security.contact if self.cfg.security else None
        signed_in = await self.web.tenant(request) is not None if self.cfg.dashboard else False
        return self.web.render(request, "security.html", sections=sections, routes=self.routes, contact=contact,
                               dashboard=self.cfg.dashboard is not None, account=signed_in)

    async def txt(self, request: Request) -> Response:
        assert self.cfg.security is not None
        return PlainTextResponse(security_txt(self.cfg.security), headers={"cache-control": "max-age=3600"})

