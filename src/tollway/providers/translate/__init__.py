"""OpenAI <-> Anthropic translation: one client, every model, nothing lost on the way.

An OpenAI chat client may call a model of an `anthropic` provider, and an Anthropic
Messages client a model of an `openai`-type provider. The rule (docs/design.md): what
maps exactly is translated; what does not is refused with a 400 that names the field
(`unsupported_parameter`), before anything is reserved or forwarded. No field is dropped
in silence: the translators build the provider's body from the fields they know, and
every other field of the client's body is refused (or, when it holds the default value,
accepted as meaning nothing). docs/proxy.md, "Translation", is the field-by-field table.

Money does not change: the client's body is checked for what changes the price in its
own format (proxy/priced.py) and bounds the reservation (proxy/inbound.py; the
translated body, when larger, widens the prompt bound); the provider's usage is read in
the provider's format by its adapter's meter and priced as for any call; the client gets
that same usage in its own format: a stream's closing events are written after the
settle (relay.Ending), so they carry the usage billed, the estimate included.

Modules, in reading order:
  common.py        the refusal, field checks, usage in each format, TranslatedStream
                   (the StreamMeter the relay sees: adapter's meter, then a converter)
  to_anthropic.py  chat client -> Anthropic provider: request, response, stream events
  to_openai.py     Messages client -> OpenAI-format provider: the same, reversed
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tollway.errors import TollwayError, render_anthropic_sse, render_sse
from tollway.money import Usage
from tollway.providers.base import CHAT, MESSAGES, StreamMeter, Target
from tollway.providers.translate import to_anthropic, to_openai
from tollway.providers.translate.common import TranslatedStream, guarded


@dataclass(frozen=True, slots=True)
class Translation:
    """One direction: the provider's endpoint and the client <-> provider functions."""

    upstream_endpoint: str
    request: Callable[[dict[str, Any], Target], dict[str, Any]]  # raises BadRequest naming a field
    response: Callable[[dict[str, Any], Usage, str], dict[str, Any]]  # raises UpstreamError
    # (adapter's meter, target, wants_usage): the relay's meter and its Ending
    stream: Callable[[StreamMeter, Target, bool], TranslatedStream]
    error_event: Callable[[TollwayError], bytes]  # in the client's format
    drop_headers: tuple[str, ...]  # client headers that mean nothing to the provider's format


def _chat_limit(body: dict[str, Any]) -> int:
    # inbound.shape wrote the output bound into whichever field(s) the body carries.
    return int(body.get("max_completion_tokens") or body["max_tokens"])


CHAT_TO_MESSAGES = Translation(
    MESSAGES,
    lambda body, target: to_anthropic.request(body, _chat_limit(body)),
    guarded(to_anthropic.response),
    lambda meter, target, wants_usage: TranslatedStream(meter, to_anthropic.AnthropicToChat(target.slug,
                                                                                             wants_usage)),
    render_sse, ())
MESSAGES_TO_CHAT = Translation(
    CHAT,
    lambda body, target: to_openai.request(body, target.output_field),
    guarded(to_openai.response),
    lambda meter, target, wants_usage: TranslatedStream(meter, to_openai.ChatToAnthropic(target.slug)),
    render_anthropic_sse, ("anthropic-version", "anthropic-beta"))


def translation_for(endpoint: str, served: frozenset[str]) -> Translation | None:
    """The translation a call on `endpoint` needs for a provider serving `served`, if any."""
    if endpoint in served:
        return None
    if endpoint == CHAT and MESSAGES in served:
        return CHAT_TO_MESSAGES
    if endpoint == MESSAGES and CHAT in served:
        return MESSAGES_TO_CHAT
    return None
