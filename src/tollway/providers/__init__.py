"""Adapters by wire format; vendors are configuration rows, not code.

anthropic.py, openai.py, echo.py  one adapter per wire format (echo: offline, OpenAI's)
base.py                           the adapter contract, usage bounds, estimates
tenant_tag.py                     the tenant's pseudonym in provider-side user fields
translate/                        OpenAI <-> Anthropic, for a client of the other format
"""

from __future__ import annotations

from tollway.providers.anthropic import AnthropicAdapter
from tollway.providers.base import Adapter
from tollway.providers.echo import EchoAdapter
from tollway.providers.openai import OpenAIAdapter

# Keyed by config.ProviderConfig.type.
ADAPTERS: dict[str, Adapter] = {
    "openai": OpenAIAdapter(),
    "anthropic": AnthropicAdapter(),
    "echo": EchoAdapter(),
}
