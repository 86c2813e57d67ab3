"""The client's side of a /v1 request: headers, the body read under its limit, and the
few fields Tollway reads (model, stream, stream_options, max_tokens,
max_completion_tokens, max_output_tokens, n, best_of, the price-changing ones priced.py
refuses and the stored-state ones stored.py refuses). Tollway writes only the output
bound; everything else in the body is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Receive, Scope

from tollway.config import ModelConfig
from tollway.errors import BadRequest, PayloadTooLarge
from tollway.providers.base import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, RESPONSES
from tollway.proxy import priced, stored


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


def header_map(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes: a Content-Length
    over the limit is refused before reading, and a chunked or lying body is counted."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(_too_large(limit))
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        part = message.get("body", b"")
        if part:
            size += len(part)
            if size > limit:
                raise PayloadTooLarge(_too_large(limit))
            parts.append(part)
        if not message.get("more_body", False):
            break
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(limit: int) -> str:
    return f"The request body is larger than this gateway accepts ({limit} bytes)."


def parse_json(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise BadRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # Position only: orjson's message is generic, and the body is never quoted.
        raise BadRequest(f"The request body is not valid JSON (error at line {exc.lineno}, column "
                         f"{exc.colno}).") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def model_slug(body: dict[str, Any]) -> str:
    slug = body.get("model")
    if slug is None:
        raise BadRequest("Missing required field 'model'.", param="model")
    if not isinstance(slug, str) or not slug:
        raise BadRequest("'model' must be a non-empty string.", param="model")
    return slug


@dataclass(frozen=True, slots=True)
class Shape:
    stream: bool
    wants_usage: bool  # stream_options.include_usage as the client sent it
    completion_bound: int  # tokens: the most this request can generate, all choices together
    prompt_bound: int  # tokens: the most its prompt can count


_REQUIRED = {CHAT: ("messages", list), COMPLETIONS: ("prompt", None), EMBEDDINGS: ("input", None),
             MESSAGES: ("messages", list), RESPONSES: ("input", str | list)}
_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens")


def shape(endpoint: str, body: dict[str, Any], size: int, model: ModelConfig, headers: dict[str, str],
          output_field: str = "max_tokens") -> Shape:
    """Check the fields Tollway relies on, refuse what changes the price (priced.py), derive
    the reservation's bounds, and put the output bound in the body for the provider to
    enforce: `output_field` when the client sent none, and a client value above the
    model's `max_output_tokens` lowered to it. `size`: the body's bytes."""
    field, kind = _REQUIRED[endpoint]
    value = body.get(field)
    if value is None:
        raise BadRequest(f"Missing required field '{field}'.", param=field)
    if kind is list and not (isinstance(value, list) and value):
        raise BadRequest(f"'{field}' must be a non-empty array.", param=field)
    if kind is not None and kind is not list and not (isinstance(value, kind) and value):
        raise BadRequest(f"'{field}' must be a non-empty string or array.", param=field)
    priced.check_headers(headers)
    if endpoint == EMBEDDINGS:
        return Shape(False, False, 0, size)
    stream = body.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object.", param="stream_options")
    wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    if endpoint == RESPONSES:
        stored.check(body)
    extra = priced.check_body(endpoint, body)
    prompt = _prompt_bound(size + extra.prompt_tokens, extra.media, model)
    if endpoint == MESSAGES:
        limit = _positive(body, "max_tokens")
        if limit is None:
            raise BadRequest("Missing required field 'max_tokens'.", param="max_tokens")
        if limit > model.max_output_tokens:
            body["max_tokens"] = limit = model.max_output_tokens
        return Shape(stream, wants_usage, limit, prompt)
    if endpoint == RESPONSES:  # one answer; its bound counts reasoning too
        limit = min(model.max_output_tokens, _positive(body, "max_output_tokens") or model.max_output_tokens)
        body["max_output_tokens"] = limit
        return Shape(stream, True, limit, prompt)  # usage is part of every Responses stream
    # A provider may read either field: every one sent carries the same, smallest, bound.
    sent = [name for name in _OUTPUT_FIELDS if _positive(body, name) is not None]
    limit = min([model.max_output_tokens, *(body[name] for name in sent)])
    for name in sent or [output_field if endpoint == CHAT else "max_tokens"]:
        body[name] = limit
    choices = max(_positive(body, "n") or 1, _positive(body, "best_of") or 1)
    return Shape(stream, wants_usage, limit * choices, prompt)


def widen(prompt_bound: int, extra_bytes: int, model: ModelConfig) -> int:
    """The prompt bound of a call whose body was translated (providers/translate): the
    provider reads the translated body, so when it is the larger, its size bounds the
    prompt, under the same cap by the model's context window."""
    if extra_bytes <= 0:
        return prompt_bound
    window = model.max_input_tokens
    return prompt_bound + extra_bytes if window is None else min(prompt_bound + extra_bytes, window)


def _prompt_bound(bounded: int, media: str | None, model: ModelConfig) -> int:
    """The body's bytes (plus what the provider adds) bound its tokens, unless it carries an
    input they do not bound: then only the model's context window does."""
    window = model.max_input_tokens
    if media is None:
        return bounded if window is None else min(bounded, window)
    if window is None:
        raise priced.refuse(media, "its tokens are not bounded by its size and this model has no "
                                   "max_input_tokens configured to bound them")
    return window


def _positive(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise BadRequest(f"'{name}' must be a positive integer.", param=name)
    return v
