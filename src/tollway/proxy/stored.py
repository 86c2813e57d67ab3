"""What the Responses API keeps at the provider, and why a request may not use it.

Every tenant's requests go out on the operator's one provider account, and OpenAI keeps
a response (and its input items) per account for 30 days unless it is sent
`store: false`. Whatever references that state by id would let one tenant read another's
conversation (an id leaks through logs, screenshots, a shared agent transcript, or is
simply the attacker's own guess), and its tokens are billed by the provider without the
request's size bounding them, so the reservation could not cover them. So:

  * `store` is always sent false (providers/responses.py); a client that asks for
    `store: true` is told so, not silently served unstored;
  * fields that read stored state are refused: `previous_response_id`, `conversation`,
    `prompt` (a stored prompt template of the operator's account), input items of type
    `item_reference`, and `reasoning` items without their `encrypted_content` (the
    provider looks those up by id);
  * `background: true` is refused: its answer is fetched later by id (which needs it
    stored) and is billed outside this request.

A stateless client (Codex with `store: false`, the SDK with
`include=["reasoning.encrypted_content"]`) sends the whole conversation in `input` and
works unchanged. Each refusal is a 400 `unsupported_parameter` naming the field, before
anything is held or forwarded. docs/proxy.md has the same table.
"""

from __future__ import annotations

from typing import Any

from tollway.errors import BadRequest

_READS_STORED = {
    "previous_response_id": "stored responses are not kept by this gateway; send the conversation in 'input'",
    "conversation": "stored conversations are not kept by this gateway; send the conversation in 'input'",
    "prompt": "stored prompt templates belong to the gateway's provider account; send the instructions and "
              "input themselves",
}

# Flags accepted as false (or absent) only.
_NEVER_TRUE = {
    "store": "responses are never stored on the provider account this gateway shares between its customers; send "
             "store: false or leave it out",
    "background": "a background response is fetched later from storage and billed outside this request",
}


def refuse(param: str, why: str) -> BadRequest:
    return BadRequest(f"'{param}' is not accepted by this gateway: {why}.", code="unsupported_parameter", param=param)


def check(body: dict[str, Any]) -> None:
    """Refuse what would read or create state kept at the provider (module docstring)."""
    for name, why in _READS_STORED.items():
        if body.get(name) is not None:
            raise refuse(name, why)
    for name, why in _NEVER_TRUE.items():
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise BadRequest(f"'{name}' must be true or false.", param=name)
        if value:
            raise refuse(name, why)
    items = body.get("input")
    if isinstance(items, list):
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if kind == "item_reference":
                raise refuse(f"input[{i}]", "items stored at the provider cannot be referenced; send the item itself")
            if kind == "reasoning" and item.get("encrypted_content") is None:
                raise refuse(f"input[{i}]", "a reasoning item without its encrypted_content is looked up in "
                                            "storage; ask for include=['reasoning.encrypted_content'] and send "
                                            "the item back with it")
