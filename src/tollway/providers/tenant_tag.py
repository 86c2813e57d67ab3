"""Per-tenant pseudonyms for the provider's own per-user state.

Every tenant's requests go out on the operator's one provider account, so whatever the
provider keeps per account is shared between tenants: above all its prompt cache, whose
hits show in `cached_tokens` and in latency, so one tenant can test a guess of another's
prompt. OpenAI partitions cache routing by `prompt_cache_key` and attributes abuse by
`safety_identifier` (`user` before it); Anthropic takes `metadata.user_id`. Tollway sets
them to a pseudonym of the tenant, and namespaces a value the client sent itself (its own
end users stay apart, but two tenants sending the same value no longer meet).

The pseudonym is an HMAC of (provider, tenant id) under a key derived from the server's
key secret: the provider cannot turn it back into the tenant id, two providers cannot
join their records on it, and a tenant cannot compute another's. Rotating the key secret
changes every pseudonym (caches warm up again).

Which fields a provider gets is `providers.NAME.tenant_fields` (config.md): not every
OpenAI-compatible vendor accepts these fields, so only api.openai.com gets them by
default; a field the client sent is namespaced whatever the setting (the vendor got it
from the client anyway).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from tollway.auth.key_secret import KeySecret
    from tollway.config import ProviderConfig

_OPENAI_HOSTS = frozenset({"api.openai.com"})


class TenantTag:
    """One tenant's pseudonym at one provider, computed on first use: most requests (a
    provider with `tenant_fields = none`, no client-sent field) never need it."""

    __slots__ = ("_key", "_of", "_tag")

    def __init__(self, key: bytes, of: bytes) -> None:
        self._key = key
        self._of = of
        self._tag: str | None = None

    @property
    def tag(self) -> str:
        if self._tag is None:
            self._tag = "tw_" + hmac.digest(self._key, self._of, "sha256").hex()[:32]
        return self._tag

    def of(self, value: object) -> str:
        """A client-chosen value, kept apart per tenant (the same value, the same result)."""
        text = value if isinstance(value, str) else repr(value)
        return self.tag + "_" + hmac.digest(self._key, (self.tag + "\0" + text).encode(), "sha256").hex()[:16]


class TenantTagger:
    def __init__(self, secret: KeySecret) -> None:
        # A subkey of its own: hash() of a string no customer key can equal (keys are ak_...).
        self._key = bytes.fromhex(secret.hash("tollway tenant tag v1"))

    def tag(self, provider: str, tenant_id: str) -> TenantTag:
        return TenantTag(self._key, f"{provider}\0{tenant_id}".encode())


def resolve_fields(provider: ProviderConfig) -> str:
    """`tenant_fields` with "auto" decided: what this provider is sent unasked."""
    mode = provider.tenant_fields
    if mode != "auto":
        return mode
    if provider.type == "anthropic":
        return "user"
    if provider.type == "openai" and (urlsplit(provider.base_url).hostname or "") in _OPENAI_HOSTS:
        return "openai"
    return "none"
