"""Adapters by wire format; vendors are configuration rows, not code."""

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
