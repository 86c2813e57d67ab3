"""What a stream is billed when it ended on the gateway's side before the provider's
usage arrived: its client left or stopped reading past the deadline, or the gateway hung
up on a silent provider (stream_idle_timeout_seconds, request_timeout_seconds).

After a disconnect the relay keeps reading the provider's stream, forwarding nothing,
for up to server.disconnect_drain_seconds and server.disconnect_drain_bytes (relay.py):
the provider bills the operator for everything it generated, hidden reasoning and the
prompt's real token count included, and its usage says how much. Only when that usage
cannot be had (a cap reached, the provider failed, or it sends none) does this rule
apply, and it errs against the customer, never the operator:

  completion = seen + hidden
    seen   = max(output tokens the provider reported so far, ⌈text bytes seen ÷ 4⌉),
             the text counted on everything read, delivered or drained;
    hidden = the reservation's output bound - seen (at least 0), when the request may
             generate reasoning it does not stream: the model is configured with
             `hidden_reasoning = true`, or the request asks for reasoning
             (`reasoning_effort`, `reasoning`, Anthropic `thinking`); otherwise 0.
             Priced as reasoning tokens (the model's reasoning price, else output).
  prompt = the provider's count if it sent one (Anthropic's message_start), else the
           reservation's prompt bound (the request body's size in bytes: no tokenizer
           yields more tokens than bytes for text).
"""

from __future__ import annotations

from typing import Any

from tollway.config import ModelConfig
from tollway.money import Usage
from tollway.providers.base import tokens_from_bytes

_REASONING_FIELDS = ("reasoning_effort", "reasoning")


def may_reason_hidden(model: ModelConfig | None, body: dict[str, Any]) -> bool:
    if model is not None and model.hidden_reasoning:
        return True
    if any(body.get(f) for f in _REASONING_FIELDS):
        return True
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") not in (None, "disabled")


def conservative_usage(model: ModelConfig | None, body: dict[str, Any], prompt_bound: int, output_bound: int,
                       text_bytes: int, known: Usage | None) -> Usage:
    """The rule of the module docstring; flagged estimated."""
    seen = max(known.completion_tokens if known else 0, tokens_from_bytes(text_bytes))
    hidden = max(0, output_bound - seen) if may_reason_hidden(model, body) else 0
    prompt = known.prompt_tokens if known is not None and known.prompt_tokens else prompt_bound
    return Usage(prompt_tokens=prompt, completion_tokens=seen + hidden,
                 cached_tokens=known.cached_tokens if known else 0,
                 cache_write_tokens=known.cache_write_tokens if known else 0,
                 reasoning_tokens=hidden, estimated=True)
