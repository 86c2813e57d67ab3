"""tollway.toml -> frozen dataclasses.

The dataclasses below ARE the config schema: the loader walks their fields, so
validation, `tollway config check`, the docs test and the security page all read the
same table. Every error names the file, the key path and what was expected.
Secrets never live in the file: it names environment variables, resolved into `Secret`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from tollway.privacy import HOP_BY_HOP_HEADERS, metadata_header_problem

CONFIG_ENV = "TOLLWAY_CONFIG"
# Set by `tollway serve` for its worker processes: how many of them serve this database.
WORKERS_ENV = "TOLLWAY_WORKERS"
DEFAULT_CONFIG_NAME = "tollway.toml"
MAX_FALLBACKS = 5
# Provider types whose chat models can stand in for each other (the gateway translates).
_TRANSLATED_TYPES = frozenset({"openai", "anthropic", "echo"})
MAX_RETRY_ATTEMPTS = 5
# Largest per-minute rate limit (config default or a key's own): far above any real one, and
# within what both databases' integer columns and Redis's doubles hold exactly.
MAX_PER_MINUTE = 1_000_000_000


class ConfigError(Exception):
    """A mistake in tollway.toml; the message names file, key path and expectation."""


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field carrying its documentation (shown by docs and `config check`)."""
    if default is dataclasses.MISSING and "default_factory" not in kw:
        return field(metadata={"doc": text})
    if "default_factory" in kw:
        return field(default_factory=kw["default_factory"], metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


class Secret:
    """A secret read from an environment variable; its repr and str never show the value."""

    __slots__ = ("_value", "env")

    def __init__(self, env: str, value: str) -> None:
        self.env = env
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(env={self.env!r}, value='***')"

    __str__ = __repr__


# Price strings are USD per million tokens, which is exactly micro-USD per token.
Price = Decimal


@dataclass(frozen=True)
class ServerConfig:
    host: str = doc("Address the gateway listens on.", "127.0.0.1")
    port: int = doc("TCP port the gateway listens on.", 8080)
    max_body_bytes: int = doc("Largest request body accepted on /v1 (413 above).", 4_000_000)
    admin_token_env: str = doc(
        "Env var holding the bearer token of the /admin API; the API is off when unset.",
        "TOLLWAY_ADMIN_TOKEN",
    )
    key_secret_env: str = doc(
        "Env var holding the HMAC secret for customer keys at rest; embedded mode "
        "generates a 0600 file next to the database when unset.",
        "TOLLWAY_KEY_SECRET",
    )
    key_secret_previous_env: str = doc(
        "Env var holding the previous customer-key secret during a rotation: keys made with it "
        "are still accepted until it is unset (docs/keys.md).",
        "TOLLWAY_KEY_SECRET_PREVIOUS",
    )
    request_timeout_seconds: int = doc("Longest an upstream call may take in total.", 600)
    stream_idle_timeout_seconds: int = doc(
        "Longest an upstream stream may stay silent before the client gets an error event.", 60
    )
    sweep_grace_seconds: int = doc(
        "How long past the longest request (request_timeout_seconds + disconnect_drain_seconds) a hold whose "
        "request is no longer served (its settle failed) stays open before the sweep releases it; a hold of a "
        "request still served never is.", 60
    )
    disconnect_drain_seconds: int = doc(
        "After a streaming client leaves (or stops reading past request_timeout_seconds), how long the "
        "provider's stream is still read, without forwarding it, to bill the provider's own usage.", 60
    )
    disconnect_drain_bytes: int = doc(
        "Most bytes of the provider's stream read so after a client leaves; past it (or the time) the "
        "conservative rule of docs/proxy.md is billed.", 8_388_608
    )
    max_response_bytes: int = doc(
        "Largest body of a provider's non-streaming answer, counted decoded (gzip included); past it the "
        "call fails with 502 upstream_invalid_response, uncharged. A streamed event is capped at 1 MiB.",
        67_108_864
    )

    drain_timeout_seconds: int = doc(
        "On SIGTERM (or Ctrl+C) each worker stops accepting and lets the requests and streams in flight finish "
        "for up to this long; then a stream still running gets an error event and is settled by the conservative "
        "rule (docs/proxy.md), a call still waiting gets a 503, and the process exits 0.", 30
    )
    header_timeout_seconds: int = doc(
        "A request's line and headers must arrive within this long of the connection opening (or of the request's "
        "first byte, on a kept-alive connection); a client that trickles them (slowloris) gets a 408 and is "
        "disconnected.", 10
    )
    body_timeout_seconds: int = doc(
        "A request's body must arrive in full within this long of its headers; a client that trickles it gets a "
        "408 and is disconnected.", 60
    )
    max_header_bytes: int = doc(
        "Largest request line plus headers accepted (431 above).", 32_768
    )
    keepalive_timeout_seconds: int = doc(
        "How long an idle keep-alive connection stays open between requests.", 5
    )
    max_connections: int = doc(
        "Most client connections each worker process holds open; one more gets a 503 and is closed at once.", 1_000
    )
    max_streams_per_key: int = doc(
        "Most streaming requests one customer key may have running at once on each worker process (counted in "
        "that process's memory, so the gateway's limit is this times --workers); one more gets a 429.", 100
    )

    worker_release_after_seconds: int = doc(
        "A worker silent this long (no heartbeat) is presumed dead and its open reservations are released; "
        "revokes stop waiting for it after 2.5 s already. At least 5.", 60)
    retry_attempts: int = doc(
        "Retries of one model after a connection error, timeout, 408, 429 or 5xx that came before any byte "
        "reached the client (docs/proxy.md); then its fallbacks are tried. 0: none. At most 5.", 1)
    retry_backoff_ms: int = doc(
        "Wait before the first retry; each next one waits twice as long, jittered between half and all of it.",
        250)
    retry_after_cap_seconds: int = doc(
        "Longest provider retry-after / retry-after-ms honoured before a retry; a longer one moves to the next "
        "fallback at once.", 5)

    @property
    def max_request_ms(self) -> int:
        """Age past which the sweep releases a hold no request serves any more."""
        return (self.request_timeout_seconds + self.disconnect_drain_seconds + self.sweep_grace_seconds) * 1000


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = doc("sqlite:///PATH (embedded) or postgresql://user@host:port/db (no password in it).",
                   "sqlite:///tollway.db")
    password_env: str = doc("Env var holding the PostgreSQL password; empty: none (trust, peer, .pgpass).", "")
    pool_size: int = doc("PostgreSQL connections each worker process keeps, and no more: a burst waits for a "
                         "free one.", 10)
    pool_timeout_seconds: int = doc("Longest a request waits for a free PostgreSQL connection before a 503.", 10)


@dataclass(frozen=True)
class CacheConfig:
    url: str = doc("memory:// (one process) or redis://host:port/db (shared by workers; no password in it).",
                   "memory://")
    password_env: str = doc("Env var holding the Redis password (AUTH); empty: none.", "")
    key_ttl_seconds: int = doc(
        "How long a verified key stays cached (with Redis: in Redis and each worker's memory together).", 60)
    negative_ttl_seconds: int = doc("How long an unknown key stays cached as unknown.", 5)


@dataclass(frozen=True)
class RetentionConfig:
    access_log_days: int = doc("Days access-log rows are kept; usage and ledger are kept.", 30)


@dataclass(frozen=True)
class LimitsConfig:
    requests_per_minute: int = doc(
        "Requests per minute each key may send (0: unlimited); a key's own setting (`keys update --rpm`) "
        "overrides it. Over it: 429 rate_limit_exceeded with Retry-After (docs/proxy.md, Rate limits).", 0)
    tokens_per_minute: int = doc(
        "Tokens (prompt + completion, as billed) per minute each key may use (0: unlimited); a key's own "
        "setting (`--tpm`) overrides it. Counted when a call settles.", 0)


@dataclass(frozen=True)
class AttributionConfig:
    header: str = doc("Header carrying per-customer metadata upstream.", "cf-aig-metadata")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = doc("Serve Prometheus metrics at /metrics.", True)
    tenant_labels: bool = doc("Label metrics by tenant id (unbounded label set; off).", False)
    require_admin_token: bool = doc(
        "Answer /metrics only to `Authorization: Bearer <admin token>`, as /admin does (off: anyone "
        "who reaches the listener).", False)


@dataclass(frozen=True)
class StripeConfig:
    secret_key_env: str = doc("Env var holding the Stripe secret key.", "STRIPE_SECRET_KEY")
    webhook_secret_env: str = doc(
        "Env var holding the webhook endpoint secret (whsec_...).", "STRIPE_WEBHOOK_SECRET"
    )
    currency: str = doc("ISO currency of top-ups (lowercase).", "usd")
    min_topup_usd: Price = doc("Smallest top-up a user may choose.", Decimal("5"))
    max_topup_usd: Price = doc("Largest top-up a user may choose.", Decimal("500"))
    success_url: str = doc("Where Stripe sends the user after paying.", "http://127.0.0.1:8080/dashboard/wallet?paid=1")
    cancel_url: str = doc("Where Stripe sends the user after cancelling.", "http://127.0.0.1:8080/dashboard/wallet")
    api_base: str = doc("Stripe API base URL (override only for a local fake in tests).", "https://api.stripe.com")
    webhook_tolerance_seconds: int = doc("Oldest accepted signature timestamp.", 300)


@dataclass(frozen=True)
class DashboardConfig:
    public_url: str = doc("The gateway's base URL as customers reach it (sign-in links, the OIDC redirect URI).",
                          "http://127.0.0.1:8080")
    session_secret_env: str = doc("Env var holding the secret that signs dashboard sessions and sign-in links; "
                                  "embedded mode generates a 0600 file next to the database when unset.",
                                  "TOLLWAY_SESSION_SECRET")
    session_max_age_seconds: int = doc("How long a dashboard session lasts after sign-in.", 43200)
    oidc_issuer: str = doc("OpenID Connect issuer URL (e.g. a Clerk Frontend API URL); empty: sign-in links only.",
                           "")
    oidc_client_id: str = doc("OAuth client id registered at the issuer.", "")
    oidc_client_secret_env: str = doc("Env var holding the OAuth client secret.", "TOLLWAY_OIDC_CLIENT_SECRET")
    oidc_scopes: str = doc("Scopes asked for at sign-in.", "openid email profile")


CLERK_DELETION_EVENTS = ("user.deleted", "organization.deleted")


@dataclass(frozen=True)
class AuthConfig:
    issuer: Literal["tollway", "clerk"] = doc(
        "Who issues customer keys: tollway (keys made and checked here) or clerk (Clerk API keys, verified "
        "through Clerk's Backend API and cached; docs/keys.md).", "tollway")
    clerk_secret_key_env: str = doc("clerk: env var holding the Clerk secret key (sk_live_... / sk_test_...).",
                                    "CLERK_SECRET_KEY")
    clerk_api_url: str = doc("clerk: Clerk Backend API base URL (override only for a local fake in tests).",
                             "https://api.clerk.com")
    clerk_timeout_seconds: int = doc("clerk: longest a call to Clerk's Backend API may take (1-30); past it, a "
                                     "key not in the cache gets a 503.", 5)
    clerk_webhook_secret_env: str = doc(
        "clerk: env var holding the Svix signing secret (whsec_...) of POST /webhooks/clerk; unset: the "
        "webhook answers 503 and revocations made in Clerk take effect within cache.key_ttl_seconds.",
        "CLERK_WEBHOOK_SIGNING_SECRET")
    clerk_evict_events: list[str] = doc(
        "clerk: webhook event types whose data.id is an API key id to evict at once (Clerk documents no "
        "API-key event today; user.deleted and organization.deleted always act).", default_factory=list)
    clerk_frontend_api_url: str = doc(
        "clerk: the instance's Frontend API URL (https://clerk.<domain>); the dashboard signs in with it as "
        "the OpenID Connect issuer when dashboard.oidc_issuer is empty.", "")

    @property
    def clerk(self) -> bool:
        return self.issuer == "clerk"


@dataclass(frozen=True)
class SecurityConfig:
    contact: str = doc("Vulnerability contact for /.well-known/security.txt: a mailto: or https: URI.")
    expires_days: int = doc("security.txt's Expires lies this many days after each response (1-365).", 180)
    preferred_languages: str = doc("security.txt Preferred-Languages, e.g. \"en, de\"; empty: omitted.", "en")
    policy: str = doc("URL of the disclosure policy (security.txt Policy); empty: omitted.", "")
    canonical: str = doc("URL where security.txt is published (Canonical); empty: omitted.", "")


ProviderType = Literal["openai", "anthropic", "echo"]


@dataclass(frozen=True)
class ProviderConfig:
    type: ProviderType = doc("Wire format: openai (OpenAI-compatible), anthropic, or echo (offline demo).")
    base_url: str = doc("Upstream base URL, e.g. https://api.deepseek.com/v1.", "")
    api_key_env: str = doc("Env var holding the provider key (not needed for echo).", "")
    extra_headers: dict[str, str] = doc(
        "Extra headers sent upstream (names of env vars are not expanded).", default_factory=dict
    )
    cf_collect_log_payload: bool = doc(
        "Send cf-aig-collect-log-payload: false when false (Cloudflare AI Gateway keeps "
        "metadata, not bodies).",
        True,
    )
    cf_aig_token_env: str = doc("Env var with a cf-aig-authorization token (Authenticated Gateway).", "")
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = doc(
        "openai type: the chat field that carries the output bound when the client sends none "
        "(OpenAI's reasoning models need max_completion_tokens).", "max_tokens")
    tenant_fields: Literal["auto", "openai", "user", "none"] = doc(
        "Per-tenant pseudonyms sent unasked: openai (prompt_cache_key and safety_identifier on chat, user "
        "elsewhere), user (user; Anthropic: metadata.user_id), none; auto is openai for api.openai.com, user "
        "for anthropic, else none. Client-sent values are namespaced per tenant always.",
        "auto",
    )
    responses_api: Literal["auto", "on", "off"] = doc(
        "openai type: serve POST /v1/responses (OpenAI's Responses API) for this provider's models: on, off, or "
        "auto (on for api.openai.com only; turn it on for another vendor that serves /responses).", "auto")
    name: str = ""  # filled from the table name, not a TOML key


@dataclass(frozen=True)
class ModelConfig:
    id: str = doc("The slug customers send, e.g. deepseek/deepseek-chat.")
    provider: str = doc("Name of a [providers.NAME] table.")
    upstream: str = doc("Model name sent to the provider.")
    input_usd_per_mtok: Price = doc("USD per million prompt tokens (decimal string).")
    output_usd_per_mtok: Price = doc("USD per million completion tokens (decimal string).")
    cached_input_usd_per_mtok: Price | None = doc("USD per million cached prompt tokens.", None)
    reasoning_usd_per_mtok: Price | None = doc(
        "USD per million reasoning tokens when priced apart from output.", None
    )
    cache_write_usd_per_mtok: Price | None = doc("USD per million cache-write prompt tokens.", None)
    max_output_tokens: int = doc(
        "Most tokens one answer (each choice) may generate: sent upstream when a request sets no "
        "max_tokens, and a larger value is lowered to it.", 4096
    )
    max_input_tokens: int | None = doc(
        "The model's context window in tokens: caps the prompt's reservation, and is what requests with "
        "images, documents or files reserve (refused while unset).", None)
    kind: Literal["chat", "embedding"] = doc("chat (chat/completions) or embedding.", "chat")
    hidden_reasoning: bool = doc(
        "The model may generate reasoning it does not stream (OpenAI o-series, summarised thinking): a stream "
        "left before its usage could be read is billed up to its output bound (docs/proxy.md).", False
    )
    fallbacks: tuple[str, ...] = doc(
        "Model ids tried in order when this one fails before answering (docs/proxy.md): each of the same "
        "kind; a chat model may fall back to one of the other wire format (translated), an embedding model only "
        "to the same provider type; not followed further (their own fallbacks are not used). At most 5.", ())


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    attribution: AttributionConfig | None = None
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    stripe: StripeConfig | None = None
    dashboard: DashboardConfig | None = None  # /dashboard exists only with a [dashboard] table
    security: SecurityConfig | None = None    # security.txt exists only with a [security] table
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    models: list[ModelConfig] = field(default_factory=list)
    source: str = "<defaults>"  # the file it came from
    _by_id: dict[str, ModelConfig] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Built once: the /v1 hot path resolves a slug with one dict lookup.
        object.__setattr__(self, "_by_id", {m.id: m for m in self.models})

    def model(self, slug: str) -> ModelConfig | None:
        return self._by_id.get(slug)

    def env_references(self) -> list[tuple[str, str]]:
        """(purpose, env var name) for every secret the config refers to."""
        refs = [("admin API token", self.server.admin_token_env),
                ("customer-key HMAC secret", self.server.key_secret_env),
                ("previous customer-key secret (only during a rotation)", self.server.key_secret_previous_env)]
        for p in self.providers.values():
            if p.api_key_env:
                refs.append((f"provider {p.name} key", p.api_key_env))
            if p.cf_aig_token_env:
                refs.append((f"provider {p.name} cf-aig-authorization", p.cf_aig_token_env))
        if self.database.password_env:
            refs.append(("database password", self.database.password_env))
        if self.cache.password_env:
            refs.append(("Redis password", self.cache.password_env))
        if self.stripe:
            refs.append(("Stripe secret key", self.stripe.secret_key_env))
            refs.append(("Stripe webhook secret", self.stripe.webhook_secret_env))
        if self.auth.clerk:
            refs.append(("Clerk secret key", self.auth.clerk_secret_key_env))
            refs.append(("Clerk webhook signing secret", self.auth.clerk_webhook_secret_env))
        if self.dashboard:
            refs.append(("dashboard session secret", self.dashboard.session_secret_env))
            if self.dashboard.oidc_issuer or (self.auth.clerk and self.auth.clerk_frontend_api_url):
                refs.append(("dashboard OIDC client secret", self.dashboard.oidc_client_secret_env))
        return refs


# --- loading -----------------------------------------------------------------------------


def find_config_path(explicit: str | None) -> Path:
    """--config, then $TOLLWAY_CONFIG, then ./tollway.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return Path(DEFAULT_CONFIG_NAME)


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found (run `tollway init` to write a starter config)") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse(data, source=str(p))


def parse(data: dict[str, Any], source: str = "<string>") -> Config:
    loader = _Loader(source)
    return loader.config(data)


class _Loader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {message}")

    def config(self, data: dict[str, Any]) -> Config:
        known = {"server", "database", "cache", "retention", "auth", "limits", "attribution", "metrics", "stripe",
                 "providers", "models", "dashboard", "security"}
        self._unknown(data, known, "")
        providers_raw = data.get("providers", {})
        if not isinstance(providers_raw, dict):
            raise self.fail("providers", "expected a table of [providers.NAME] tables")
        providers: dict[str, ProviderConfig] = {}
        for name, table in providers_raw.items():
            prov = self.dataclass(ProviderConfig, table, f"providers.{name}", skip={"name"})
            providers[name] = dataclasses.replace(prov, name=name)
            self._check_provider(prov, f"providers.{name}")
        models_raw = data.get("models", [])
        if not isinstance(models_raw, list):
            raise self.fail("models", "expected an array of [[models]] tables")
        models: list[ModelConfig] = []
        seen: set[str] = set()
        for i, table in enumerate(models_raw):
            path = f"models[{i}]"
            m = self.dataclass(ModelConfig, table, path)
            if m.id in seen:
                raise self.fail(f"{path}.id", f"duplicate model id {m.id!r}; each id must be unique")
            seen.add(m.id)
            if m.provider not in providers:
                raise self.fail(
                    f"{path}.provider",
                    f"no provider named {m.provider!r}; expected one of {sorted(providers) or 'none defined'}",
                )
            for key in ("max_output_tokens", "max_input_tokens"):
                bound = getattr(m, key)
                if bound is not None and bound <= 0:
                    raise self.fail(f"{path}.{key}", f"expected a positive integer, got {bound}")
            models.append(m)
        self._check_fallbacks(models, providers)
        cfg = Config(
            server=self.dataclass(ServerConfig, data.get("server", {}), "server"),
            database=self.dataclass(DatabaseConfig, data.get("database", {}), "database"),
            cache=self.dataclass(CacheConfig, data.get("cache", {}), "cache"),
            retention=self.dataclass(RetentionConfig, data.get("retention", {}), "retention"),
            auth=self.dataclass(AuthConfig, data.get("auth", {}), "auth"),
            limits=self.dataclass(LimitsConfig, data.get("limits", {}), "limits"),
            attribution=(
                self.dataclass(AttributionConfig, data["attribution"], "attribution")
                if "attribution" in data
                else None
            ),
            metrics=self.dataclass(MetricsConfig, data.get("metrics", {}), "metrics"),
            stripe=self.dataclass(StripeConfig, data["stripe"], "stripe") if "stripe" in data else None,
            dashboard=self.dataclass(DashboardConfig, data["dashboard"], "dashboard") if "dashboard" in data else None,
            security=self.dataclass(SecurityConfig, data["security"], "security") if "security" in data else None,
            providers=providers,
            models=models,
            source=self.source,
        )
        self._check(cfg)
        return cfg

    def _check_fallbacks(self, models: list[ModelConfig], providers: dict[str, ProviderConfig]) -> None:
        """A fallback must serve what its model serves: the same kind, and the same wire
        format, or, for chat models, the other one through translation (providers/translate:
        what cannot be translated exactly skips that fallback for that call)."""
        by_id = {m.id: m for m in models}
        for i, m in enumerate(models):
            path = f"models[{i}].fallbacks"
            if len(m.fallbacks) > MAX_FALLBACKS:
                raise self.fail(path, f"expected at most {MAX_FALLBACKS} fallbacks, got {len(m.fallbacks)}")
            if len(set(m.fallbacks)) != len(m.fallbacks):
                raise self.fail(path, "lists a model twice")
            for fb in m.fallbacks:
                other = by_id.get(fb)
                if fb == m.id:
                    raise self.fail(path, f"{fb!r} is this model itself")
                if other is None:
                    hint = difflib.get_close_matches(fb, sorted(by_id), n=1)
                    raise self.fail(path, f"no model with id {fb!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
                if other.kind != m.kind:
                    raise self.fail(path, f"{fb!r} is of kind {other.kind} and {m.id!r} of kind {m.kind}")
                mine, theirs = providers[m.provider].type, providers[other.provider].type
                if mine != theirs and not (m.kind == "chat" and {mine, theirs} <= _TRANSLATED_TYPES):
                    raise self.fail(path, f"{fb!r} speaks the {theirs} wire format and {m.id!r} the {mine} one; "
                                          f"only chat models fall back across wire formats (translated)")

    def _check_provider(self, p: ProviderConfig, path: str) -> None:
        for name in p.extra_headers:
            if name.lower() in HOP_BY_HOP_HEADERS:
                raise self.fail(f"{path}.extra_headers.{name}", "a hop-by-hop or framing header, set by the client")
        if p.type != "echo":
            if not p.base_url.startswith(("http://", "https://")):
                raise self.fail(f"{path}.base_url", "expected an http:// or https:// URL")
            if not p.api_key_env:
                raise self.fail(f"{path}.api_key_env", "expected the name of the env var holding the provider key")
        if p.responses_api == "on" and p.type != "openai":
            raise self.fail(f"{path}.responses_api", "only an openai-type provider can serve the Responses API")

    def _check(self, cfg: Config) -> None:
        url = cfg.database.url
        if not (url.startswith("sqlite:///") or url.startswith(("postgresql://", "postgres://"))):
            raise self.fail("database.url", f"unsupported URL {url!r}; expected sqlite:///PATH or postgresql://...")
        curl = cfg.cache.url
        if not (curl == "memory://" or curl.startswith(("redis://", "rediss://"))):
            raise self.fail("cache.url", f"unsupported URL {curl!r}; expected memory:// or redis://host:port/db")
        # Secrets live in the environment, never in this file.
        for section, u in (("database", url), ("cache", curl)):
            if urlsplit(u).password is not None:
                raise self.fail(f"{section}.url", f"holds a password; put it in an environment variable and name "
                                                  f"that in {section}.password_env")
        if cfg.database.password_env and not url.startswith(("postgresql://", "postgres://")):
            raise self.fail("database.password_env", "only PostgreSQL takes a password")
        if cfg.cache.password_env and curl == "memory://":
            raise self.fail("cache.password_env", "only Redis takes a password")
        for path, value in (
            ("server.port", cfg.server.port),
            ("server.max_body_bytes", cfg.server.max_body_bytes),
            ("server.request_timeout_seconds", cfg.server.request_timeout_seconds),
            ("server.stream_idle_timeout_seconds", cfg.server.stream_idle_timeout_seconds),
            ("server.sweep_grace_seconds", cfg.server.sweep_grace_seconds),
            ("server.disconnect_drain_seconds", cfg.server.disconnect_drain_seconds),
            ("server.disconnect_drain_bytes", cfg.server.disconnect_drain_bytes),
            ("server.max_response_bytes", cfg.server.max_response_bytes),
            ("server.drain_timeout_seconds", cfg.server.drain_timeout_seconds),
            ("server.header_timeout_seconds", cfg.server.header_timeout_seconds),
            ("server.body_timeout_seconds", cfg.server.body_timeout_seconds),
            ("server.max_header_bytes", cfg.server.max_header_bytes),
            ("server.keepalive_timeout_seconds", cfg.server.keepalive_timeout_seconds),
            ("server.max_connections", cfg.server.max_connections),
            ("server.max_streams_per_key", cfg.server.max_streams_per_key),
            ("cache.key_ttl_seconds", cfg.cache.key_ttl_seconds),
            ("retention.access_log_days", cfg.retention.access_log_days),
            ("database.pool_size", cfg.database.pool_size),
            ("database.pool_timeout_seconds", cfg.database.pool_timeout_seconds),
            ("server.retry_backoff_ms", cfg.server.retry_backoff_ms),
        ):
            if value <= 0:
                raise self.fail(path, f"expected a positive integer, got {value}")
        if not 0 <= cfg.server.retry_attempts <= MAX_RETRY_ATTEMPTS:
            raise self.fail("server.retry_attempts", f"expected 0 to {MAX_RETRY_ATTEMPTS}, got "
                                                     f"{cfg.server.retry_attempts}")
        if cfg.server.retry_after_cap_seconds < 0:
            raise self.fail("server.retry_after_cap_seconds", "expected 0 or more seconds")
        for path, value in (("limits.requests_per_minute", cfg.limits.requests_per_minute),
                            ("limits.tokens_per_minute", cfg.limits.tokens_per_minute)):
            if not 0 <= value <= MAX_PER_MINUTE:
                raise self.fail(path, f"expected 0 (unlimited) to {MAX_PER_MINUTE}, got {value}")
        if cfg.server.worker_release_after_seconds < 5:
            raise self.fail("server.worker_release_after_seconds",
                            "expected at least 5: far longer than the 2.5 s after which a revoke stops waiting")
        if cfg.server.port > 65535:
            raise self.fail("server.port", "expected a port number up to 65535")
        if cfg.attribution and (problem := metadata_header_problem(cfg.attribution.header)):
            raise self.fail("attribution.header", problem)
        if cfg.stripe and cfg.stripe.min_topup_usd > cfg.stripe.max_topup_usd:
            raise self.fail("stripe.min_topup_usd", "must not exceed stripe.max_topup_usd")
        self._check_pages(cfg)
        self._check_auth(cfg)

    def _check_auth(self, cfg: Config) -> None:
        a = cfg.auth
        if not a.clerk:
            return
        if not a.clerk_api_url.startswith(("http://", "https://")):
            raise self.fail("auth.clerk_api_url", "expected an http:// or https:// URL")
        if not 1 <= a.clerk_timeout_seconds <= 30:
            # A verification slower than this could outlive an eviction's tombstone (auth/keys.py).
            raise self.fail("auth.clerk_timeout_seconds", "expected 1 to 30 seconds")
        if not a.clerk_secret_key_env:
            raise self.fail("auth.clerk_secret_key_env", "expected the env var holding the Clerk secret key")
        for i, event in enumerate(a.clerk_evict_events):
            if not event or len(event) > 100 or event in CLERK_DELETION_EVENTS:
                raise self.fail(f"auth.clerk_evict_events[{i}]", "expected an event type such as \"apiKey.revoked\" "
                                "(user.deleted and organization.deleted always act)")
        if a.clerk_frontend_api_url and not a.clerk_frontend_api_url.startswith(("http://", "https://")):
            raise self.fail("auth.clerk_frontend_api_url", "expected the Frontend API's https:// URL")
        d = cfg.dashboard
        if d is not None and d.oidc_issuer and a.clerk_frontend_api_url and d.oidc_issuer != a.clerk_frontend_api_url:
            raise self.fail("dashboard.oidc_issuer", "with auth.issuer = \"clerk\" the dashboard signs in with Clerk: "
                            "leave it empty (auth.clerk_frontend_api_url is used) or set it to the same URL")
        if d is not None and a.clerk_frontend_api_url and not d.oidc_client_id:
            raise self.fail("dashboard.oidc_client_id", "required for sign-in with Clerk (auth.clerk_frontend_api_url)")

    def _check_pages(self, cfg: Config) -> None:
        d, sec = cfg.dashboard, cfg.security
        if d is not None:
            if not d.public_url.startswith(("http://", "https://")):
                raise self.fail("dashboard.public_url", "expected an http:// or https:// URL")
            if d.session_max_age_seconds <= 0:
                raise self.fail("dashboard.session_max_age_seconds", "expected a positive integer")
            if d.oidc_issuer and not d.oidc_issuer.startswith(("http://", "https://")):
                raise self.fail("dashboard.oidc_issuer", "expected the issuer's https:// URL")
            if d.oidc_issuer and not d.oidc_client_id:
                raise self.fail("dashboard.oidc_client_id", "required when dashboard.oidc_issuer is set")
        if sec is not None:
            if not sec.contact.startswith(("mailto:", "https://")):
                raise self.fail("security.contact", "expected a mailto: or https:// URI (RFC 9116)")
            if not 1 <= sec.expires_days <= 365:  # RFC 9116 2.5.5: less than a year ahead
                raise self.fail("security.expires_days", f"expected 1 to 365 days, got {sec.expires_days}")

    def _unknown(self, data: dict[str, Any], known: set[str], path: str) -> None:
        for key in data:
            if key not in known:
                hint = difflib.get_close_matches(key, sorted(known), n=1)
                also = f"; did you mean {hint[0]!r}?" if hint else f"; expected one of {sorted(known)}"
                raise self.fail(f"{path}{key}" if not path else f"{path}.{key}", f"unknown key{also}")

    def dataclass(self, cls: type[Any], data: Any, path: str, skip: frozenset[str] | set[str] = frozenset()) -> Any:
        if not isinstance(data, dict):
            raise self.fail(path, f"expected a table, got {_tname(data)}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
        self._unknown(data, set(fields), path)
        hints = get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            key_path = f"{path}.{name}"
            if name in data:
                kwargs[name] = self.value(hints[name], data[name], key_path)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.fail(key_path, "required key is missing")
        return cls(**kwargs)

    def value(self, hint: Any, value: Any, path: str) -> Any:
        origin = get_origin(hint)
        if origin in (Union, types.UnionType):
            args = [a for a in get_args(hint) if a is not type(None)]
            return self.value(args[0], value, path)
        if origin is Literal:
            choices = get_args(hint)
            if value not in choices:
                raise self.fail(path, f"expected one of {list(choices)}, got {value!r}")
            return value
        if origin is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(path, "expected an array of strings")
            return list(value)
        if origin is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(path, "expected an array of strings")
            return tuple(value)
        if origin is dict:
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise self.fail(path, "expected a table of strings")
            return dict(value)
        if hint is Decimal:
            return self.price(value, path)
        if hint is bool:
            if not isinstance(value, bool):
                raise self.fail(path, f"expected true or false, got {_tname(value)}")
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(path, f"expected an integer, got {_tname(value)}")
            return value
        if hint is str:
            if not isinstance(value, str):
                raise self.fail(path, f"expected a string, got {_tname(value)}")
            return value
        raise self.fail(path, f"unsupported type {hint}")  # pragma: no cover - schema bug

    def price(self, value: Any, path: str) -> Decimal:
        if not isinstance(value, str):
            raise self.fail(
                path, f'expected a decimal string such as "0.27" (floats are inexact), got {_tname(value)}'
            )
        try:
            d = Decimal(value)
        except InvalidOperation:
            raise self.fail(path, f'expected a decimal string such as "0.27", got {value!r}') from None
        if not d.is_finite():
            raise self.fail(path, f"expected a finite amount, got {value!r}")
        if d < 0:
            raise self.fail(path, f"expected a non-negative amount, got {value!r}")
        return d


def _tname(v: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a float", bool: "a boolean", list: "an array",
             dict: "a table"}
    return names.get(type(v), type(v).__name__)


def resolve_secret(env: str, *, path: str, source: str) -> Secret:
    value = os.environ.get(env, "")
    if not value:
        raise ConfigError(f"{source}: {path}: environment variable {env} is not set (it must hold the secret)")
    return Secret(env, value)


def provider_secrets(cfg: Config) -> dict[str, Secret]:
    """Resolve the keys of providers that some model uses; called at `serve`, not `check`."""
    used = {m.provider for m in cfg.models}
    out: dict[str, Secret] = {}
    for name in sorted(used):
        p = cfg.providers[name]
        if p.type == "echo":
            continue
        out[name] = resolve_secret(p.api_key_env, path=f"providers.{name}.api_key_env", source=cfg.source)
    return out


def schema_table() -> list[tuple[str, str, str]]:
    """(key path, default, doc) for every documented key; used by docs and tests."""
    rows: list[tuple[str, str, str]] = []
    sections: list[tuple[str, type[Any]]] = [
        ("server", ServerConfig), ("database", DatabaseConfig), ("cache", CacheConfig),
        ("retention", RetentionConfig), ("auth", AuthConfig), ("limits", LimitsConfig),
        ("attribution", AttributionConfig),
        ("metrics", MetricsConfig),
        ("stripe", StripeConfig), ("dashboard", DashboardConfig), ("security", SecurityConfig),
        ("providers.NAME", ProviderConfig), ("models[]", ModelConfig),
    ]
    for prefix, cls in sections:
        for f in dataclasses.fields(cls):
            if "doc" not in f.metadata:
                continue
            if isinstance(f.default, tuple):
                default = "[]"  # shown as the TOML it is written in
            elif f.default is not dataclasses.MISSING:
                default = repr(f.default) if not isinstance(f.default, Decimal) else f'"{f.default}"'
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "(required)"
            rows.append((f"{prefix}.{f.name}", default, f.metadata["doc"]))
    return rows
