"""The echo provider's Responses API: the answer repeats the input's last user text.

Shaped as OpenAI answers (a `response` object; streamed as response.created,
response.in_progress, the output item and its text deltas, then response.completed, or
response.incomplete when `max_output_tokens` cut the text), with usage from the same
estimate Tollway bills when a provider reports none (base.py), so the billing path of
/v1/responses runs offline too.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from tollway.providers.base import BYTES_PER_TOKEN, estimate_prompt_tokens, tokens_from_bytes


def responses(body: dict[str, Any]) -> bytes | list[bytes]:
    """The JSON answer, or the stream's events when the body asks for a stream."""
    text = _last_user_text(body.get("input"))
    limit = body.get("max_output_tokens")
    complete = not (isinstance(limit, int) and len(text.encode()) > limit * BYTES_PER_TOKEN)
    if not complete:
        assert isinstance(limit, int)
        text = text.encode()[: limit * BYTES_PER_TOKEN].decode("utf-8", "ignore")
    prompt = estimate_prompt_tokens(body)
    output = tokens_from_bytes(len(text.encode()))
    usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": output,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + output}
    item_id = "msg_" + secrets.token_hex(12)
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [part]}
    response: dict[str, Any] = {
        "id": "resp_" + secrets.token_hex(12), "object": "response", "created_at": int(time.time()),
        "status": "completed" if complete else "incomplete", "error": None,
        "incomplete_details": None if complete else {"reason": "max_output_tokens"},
        "instructions": body.get("instructions"), "max_output_tokens": limit, "model": body.get("model", "echo"),
        "output": [item], "parallel_tool_calls": True, "previous_response_id": None, "store": False,
        "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
        "top_p": 1.0, "truncation": "disabled", "usage": usage, "metadata": body.get("metadata") or {}}
    if not body.get("stream"):
        return orjson.dumps(response)
    events: list[bytes] = []

    def event(kind: str, **data: Any) -> None:
        data = {"type": kind, "sequence_number": len(events), **data}
        events.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")

    started = {**response, "status": "in_progress", "incomplete_details": None, "output": [], "usage": None}
    event("response.created", response=started)
    event("response.in_progress", response=started)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    event("response.output_item.added", output_index=0,
          item={**item, "status": "in_progress", "content": []})
    event("response.content_part.added", **where, part={**part, "text": ""})
    for i, word in enumerate(text.split(" ")):
        if word or i == 0:
            event("response.output_text.delta", **where, delta=word if i == 0 else " " + word, logprobs=[])
    event("response.output_text.done", **where, text=text, logprobs=[])
    event("response.content_part.done", **where, part=part)
    event("response.output_item.done", output_index=0, item=item)
    event("response.completed" if complete else "response.incomplete", response=response)
    return events


def _last_user_text(items: Any) -> str:
    if isinstance(items, str):
        return items
    if not isinstance(items, list):
        return ""
    for item in reversed(items):
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""
