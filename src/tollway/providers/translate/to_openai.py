"""An Anthropic client on an OpenAI-format model: /v1/messages -> chat completions.

request   Messages body -> chat body; every field maps exactly or is refused by name
          (docs/proxy.md, "Translation", has the table)
response  chat.completion -> Anthropic message, usage as billed
stream    chat.completion.chunk events -> message_start ... message_stop (ChatToAnthropic)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from tollway.errors import BadRequest, TollwayError, UpstreamError, render_anthropic_sse
from tollway.money import Usage
from tollway.providers.translate.common import (
    anthropic_usage,
    check_fields,
    invalid_answer,
    sse,
    strings,
    text_of,
    tool_list,
    untranslatable,
)

# cache_control (top level: automatic caching) is checked by priced.py and then has no
# counterpart, as on blocks (_TEXT_BLOCK).
_KNOWN = frozenset({"model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature",
                    "top_p", "tools", "tool_choice", "metadata", "cache_control"})
_NEUTRAL: dict[str, tuple[Any, ...]] = {"thinking": ({"type": "disabled"},),
                                        "service_tier": ("auto", "standard_only")}
STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
        "content_filter": "refusal"}
# A block may carry a cache_control marker: OpenAI-format providers cache prefixes on their
# own and bill the cached tokens they report, so the marker has nothing left to ask for.
_TEXT_BLOCK = frozenset({"type", "text", "cache_control"})
_NO_CITATIONS: dict[str, tuple[Any, ...]] = {"citations": ([],)}


def request(body: dict[str, Any], output_field: str) -> dict[str, Any]:
    """The chat body for a Messages body whose max_tokens is already bounded (inbound.shape)."""
    check_fields(body, _KNOWN, _NEUTRAL)
    messages = _system(body.get("system"))
    for i, m in enumerate(body["messages"]):
        messages.extend(_message(m, f"messages[{i}]"))
    out: dict[str, Any] = {"model": body["model"], "messages": messages, output_field: body["max_tokens"]}
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop_sequences")
    if stop is not None:
        out["stop"] = strings(stop, "stop_sequences")
    if body.get("stream") is True:
        out["stream"] = True
    meta = body.get("metadata")
    if meta is not None:
        if not isinstance(meta, dict):
            raise BadRequest("'metadata' must be an object.", param="metadata")
        check_fields(meta, frozenset({"user_id"}), {}, "metadata.")
        if meta.get("user_id") is not None:
            out["user"] = meta["user_id"]
    _tools(body, out)
    return out


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, list):
        for j, block in enumerate(system):
            if isinstance(block, dict):
                check_fields(block, _TEXT_BLOCK, _NO_CITATIONS, f"system[{j}].")
    return [{"role": "system", "content": _texts(system, "system")}]


def _texts(content: Any, where: str) -> str | list[dict[str, Any]]:
    """Text as OpenAI takes it: one string, or text parts when there are several blocks."""
    text = text_of(content, where, _TEXT_BLOCK)  # checks every block, naming it
    if isinstance(content, list) and len(content) > 1:
        return [{"type": "text", "text": block["text"]} for block in content]
    return text


def _tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    tools = tool_list(body, _tool)
    if tools is not None:
        out["tools"] = tools
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or kind not in ("auto", "any", "tool", "none"):
        raise untranslatable("tool_choice", "only auto, any, tool and none map to the chat format")
    check_fields(choice, frozenset({"type", "name", "disable_parallel_tool_use"}), {}, "tool_choice.")
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise BadRequest("'tool_choice.name' must be a string.", param="tool_choice.name")
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is True:
        out["parallel_tool_calls"] = False


def _tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type", "custom") not in ("custom", None):
        raise untranslatable(f"{where}.type", "only custom tools map to function tools")
    check_fields(tool, frozenset({"type", "name", "description", "input_schema", "cache_control"}), {},
                 f"{where}.")
    if not isinstance(tool.get("name"), str):
        raise BadRequest(f"'{where}.name' must be a string.", param=f"{where}.name")
    fn: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description") is not None:
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}


def _message(m: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(m, dict):
        raise BadRequest(f"'{where}' must be an object.", param=where)
    check_fields(m, frozenset({"role", "content"}), {}, f"{where}.")
    role, content = m.get("role"), m.get("content")
    if role not in ("user", "assistant"):
        raise BadRequest(f"'{where}.role' must be user or assistant.", param=f"{where}.role")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"'{where}.content' must be a string or an array of blocks.", param=f"{where}.content")
    return _user(content, f"{where}.content") if role == "user" else [_assistant(content, f"{where}.content")]


def _blocks(content: list[Any], where: str) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(path, type, block) for each block of a turn; a text block's fields are checked here."""
    for j, block in enumerate(content):
        w = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            check_fields(block, _TEXT_BLOCK, _NO_CITATIONS, f"{w}.")
        yield w, kind, block if isinstance(block, dict) else {}


def _user(content: list[Any], where: str) -> list[dict[str, Any]]:
    """Tool results become tool messages, which must directly follow the assistant's
    calls: they go first, the rest of the turn after them."""
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for w, kind, block in _blocks(content, where):
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text")})
        elif kind == "image":
            check_fields(block, frozenset({"type", "source", "cache_control"}), {}, f"{w}.")
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"), w)}})
        elif kind == "tool_result":
            # is_error has no field in the chat format: the result's text, which says what
            # failed, is what the model reads either way (docs/proxy.md).
            check_fields(block, frozenset({"type", "tool_use_id", "content", "cache_control", "is_error"}), {},
                         f"{w}.")
            if not isinstance(block.get("tool_use_id"), str):
                raise BadRequest(f"'{w}.tool_use_id' must be a string.", param=f"{w}.tool_use_id")
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": _texts(block.get("content") or "", f"{w}.content")})
        else:
            raise untranslatable(w, "only text, image and tool_result blocks map to the chat format")
    if parts:
        only_text = len(parts) == 1 and parts[0]["type"] == "text"
        results.append({"role": "user", "content": parts[0]["text"] if only_text else parts})
    return results


def _image_url(source: Any, where: str) -> str:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source, dict):
        check_fields(source, frozenset({"type", "media_type", "data"}), {}, f"{where}.source.")
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if kind == "url" and isinstance(source, dict) and isinstance(source.get("url"), str):
        check_fields(source, frozenset({"type", "url"}), {}, f"{where}.source.")
        return str(source["url"])
    raise untranslatable(f"{where}.source", "only base64 and URL images map to the chat format")


def _assistant(content: list[Any], where: str) -> dict[str, Any]:
    texts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for w, kind, block in _blocks(content, where):
        if kind == "text":
            texts.append(block)
        elif kind == "tool_use":
            check_fields(block, frozenset({"type", "id", "name", "input", "cache_control"}), {}, f"{w}.")
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise BadRequest(f"'{w}' needs a string id and name.", param=w)
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind not in ("thinking", "redacted_thinking"):
            # Earlier turns' thinking: the chat format has no field for it, and Anthropic
            # itself leaves it out of the context (docs/proxy.md).
            raise untranslatable(w, "only text, tool_use and thinking blocks map to the chat format")
    out: dict[str, Any] = {"role": "assistant", "content": _texts(texts, where) if texts else None}
    if calls:
        out["tool_calls"] = calls
    return out


def _tool_use(call: Any) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise invalid_answer("a tool call without a function name")
    args = fn.get("arguments")
    try:
        value = orjson.loads(args) if isinstance(args, str) and args.strip() else {}
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise invalid_answer("tool call arguments that are not a JSON object")
    return {"type": "tool_use", "id": call.get("id"), "name": fn["name"], "input": value}


def response(data: dict[str, Any], usage: Usage, slug: str) -> dict[str, Any]:
    choices = data.get("choices")
    if not (isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], dict)):
        raise invalid_answer("not exactly one choice")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise invalid_answer("no message")
    blocks: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    for name in ("content", "refusal"):
        if isinstance(message.get(name), str) and message[name]:
            blocks.append({"type": "text", "text": message[name]})
    blocks.extend(_tool_use(c) for c in message.get("tool_calls") or [])
    return {"id": data.get("id"), "type": "message", "role": "assistant", "model": slug, "content": blocks,
            "stop_reason": STOP.get(str(choices[0].get("finish_reason")), "end_turn"), "stop_sequence": None,
            "usage": anthropic_usage(usage)}


class ChatToAnthropic:
    """chat.completion.chunk events -> Anthropic events, one content block at a time:
    thinking (reasoning_content), text, then each tool call; arguments stream as
    input_json_delta in the pieces the provider sent."""

    __slots__ = ("_id", "_index", "_open", "_slug", "_started", "_stop", "_tools", "finished")

    def __init__(self, slug: str) -> None:
        self._slug = slug
        self._id = "msg_tollway"
        self._started = False
        self._index = -1  # the Anthropic block open now (-1: none yet)
        self._open: Any = None  # "thinking", "text", or the provider's tool call index
        self._tools: set[Any] = set()  # tool call indexes already opened
        self._stop = "end_turn"
        self.finished = False  # a finish_reason came: the answer is whole, [DONE] or not

    def convert(self, data: dict[str, Any]) -> bytes | None:
        if "error" in data:
            err = data["error"]
            message = err.get("message") if isinstance(err, dict) else err
            raise UpstreamError(f"The model provider failed mid-stream: {message if isinstance(message, str) else ''}")
        out: list[bytes] = []
        if not self._started:
            self._started = True
            if isinstance(data.get("id"), str):
                self._id = data["id"]
            out.append(sse("message_start", {"type": "message_start", "message": {
                "id": self._id, "type": "message", "role": "assistant", "model": self._slug, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}}))
        for choice in data.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                raise invalid_answer("more than one choice")
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta, out)
            finish = choice.get("finish_reason")
            if finish is not None:
                self._stop = STOP.get(str(finish), "end_turn")
                self.finished = True
        return b"\n\n".join(out) if out else None

    def _delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        reasoning = delta.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
            out.append(self._event({"type": "thinking_delta", "thinking": reasoning}))
        text = delta.get("content")
        if isinstance(text, str) and text:
            self._block("text", {"type": "text", "text": ""}, out)
            out.append(self._event({"type": "text_delta", "text": text}))
        for call in delta.get("tool_calls") or ():
            k = call.get("index", 0) if isinstance(call, dict) else None
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or isinstance(k, bool) or not isinstance(k, int):
                raise invalid_answer("a tool call delta without a function")
            if k != self._open:
                if k in self._tools:
                    raise invalid_answer("tool calls whose pieces interleave")
                self._tools.add(k)
                assert isinstance(call, dict)
                self._block(k, {"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": {}}, out)
            args = fn.get("arguments")
            if isinstance(args, str) and args:
                out.append(self._event({"type": "input_json_delta", "partial_json": args}))

    def _block(self, kind: Any, start: dict[str, Any], out: list[bytes]) -> None:
        if self._open is not None and self._open == kind:
            return
        self._close(out)
        self._index += 1
        self._open = kind
        out.append(sse("content_block_start", {"type": "content_block_start", "index": self._index,
                                               "content_block": start}))

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(sse("content_block_stop", {"type": "content_block_stop", "index": self._index}))
            self._open = None

    def _event(self, delta: dict[str, Any]) -> bytes:
        return sse("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})

    def finish(self, usage: Usage) -> bytes:
        out: list[bytes] = []
        if not self._started:  # a stream with no chunk at all still has a message to close
            out.append(self.convert({}) or b"")
        self._close(out)
        out.append(sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": self._stop, "stop_sequence": None},
                                         "usage": anthropic_usage(usage)}))
        out.append(sse("message_stop", {"type": "message_stop"}))
        return b"\n\n".join(out)

    def error(self, exc: TollwayError) -> bytes:
        return render_anthropic_sse(exc)[:-2]  # the relay adds the blank line
