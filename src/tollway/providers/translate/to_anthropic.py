"""An OpenAI chat client on an Anthropic model: /v1/chat/completions -> Messages API.

request   chat body -> Messages body; every field maps exactly or is refused by name
          (docs/proxy.md, "Translation", has the table)
response  Anthropic message -> chat.completion, usage as billed
stream    Anthropic events -> chat.completion.chunk events (AnthropicToChat)
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from tollway.errors import BadRequest, TollwayError, UpstreamError, render_sse
from tollway.money import Usage
from tollway.providers.translate.common import (
    check_fields,
    chunk,
    invalid_answer,
    json_object,
    openai_usage,
    strings,
    text_of,
    tool_list,
    untranslatable,
)

_KNOWN = frozenset({"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                    "temperature", "top_p", "stop", "tools", "tool_choice", "parallel_tool_calls", "user",
                    "safety_identifier"})
# Values that mean the default, so there is nothing to carry (clients such as LangChain send them).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "logprobs": (False,), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0),
    "store": (False,), "service_tier": ("auto", "default"), "response_format": ({"type": "text"},),
    "logit_bias": ({},), "metadata": ({},)}
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
          "refusal": "content_filter", "model_context_window_exceeded": "length", "pause_turn": "stop"}
_TOOL_CHOICE = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}


def request(body: dict[str, Any], limit: int) -> dict[str, Any]:
    """The Messages body for a chat body whose output bound (`limit`) is already set."""
    check_fields(body, _KNOWN, _NEUTRAL)
    system, messages = _messages(body["messages"])
    out: dict[str, Any] = {"model": body["model"], "max_tokens": limit, "messages": messages}
    if system:
        out["system"] = system
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, int | float) or isinstance(temperature, bool) or temperature < 0:
            raise BadRequest("'temperature' must be a number from 0 to 2.", param="temperature")
        if temperature > 1:
            raise untranslatable("temperature", "Anthropic's temperature ranges from 0 to 1")
        out["temperature"] = temperature
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop is not None:
        out["stop_sequences"] = strings(stop, "stop", one=True)
    if body.get("stream") is True:
        out["stream"] = True
    opts = body.get("stream_options")
    if isinstance(opts, dict):
        check_fields(opts, frozenset({"include_usage", "include_obfuscation"}), {}, "stream_options.")
    _user(body, out)
    _tools(body, out)
    return out


def _user(body: dict[str, Any], out: dict[str, Any]) -> None:
    user, safety = body.get("user"), body.get("safety_identifier")
    for name, value in (("user", user), ("safety_identifier", safety)):
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"'{name}' must be a string.", param=name)
    if user is not None and safety is not None and user != safety:
        raise untranslatable("safety_identifier", "Anthropic takes one end-user id (metadata.user_id), and "
                                                  "'user' already sets a different one")
    if user is not None or safety is not None:
        out["metadata"] = {"user_id": user if user is not None else safety}


def _tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    tools = tool_list(body, _tool)
    if tools is not None:
        out["tools"] = tools
    choice = body.get("tool_choice")
    if isinstance(choice, str) and choice in _TOOL_CHOICE:
        out["tool_choice"] = dict(_TOOL_CHOICE[choice])
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        check_fields(choice, frozenset({"type", "function"}), {}, "tool_choice.")
        name = choice["function"].get("name")
        if not isinstance(name, str):
            raise BadRequest("'tool_choice.function.name' must be a string.", param="tool_choice.function.name")
        out["tool_choice"] = {"type": "tool", "name": name}
    elif choice is not None:
        raise untranslatable("tool_choice", "only none, auto, required and a named function map to Anthropic")
    parallel = body.get("parallel_tool_calls")
    if parallel is False:
        tc = out.setdefault("tool_choice", {"type": "auto"})
        if tc["type"] == "none":
            return
        tc["disable_parallel_tool_use"] = True
    elif parallel is not None and parallel is not True:
        raise BadRequest("'parallel_tool_calls' must be true or false.", param="parallel_tool_calls")


def _tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise untranslatable(f"{where}.type", "only function tools map to Anthropic")
    check_fields(tool, frozenset({"type", "function"}), {}, f"{where}.")
    fn = tool["function"]
    check_fields(fn, frozenset({"name", "description", "parameters"}), {"strict": (False,)}, f"{where}.function.")
    if not isinstance(fn.get("name"), str):
        raise BadRequest(f"'{where}.function.name' must be a string.", param=f"{where}.function.name")
    out: dict[str, Any] = {"name": fn["name"],
                           "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if fn.get("description") is not None:
        out["description"] = fn["description"]
    return out


def _messages(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"'{where}' must be an object.", param=where)
        role = m.get("role")
        if role in ("system", "developer"):
            if out:
                raise untranslatable(where, "Anthropic takes the system prompt before the conversation, not "
                                            "in the middle of it")
            check_fields(m, frozenset({"role", "content"}), {}, f"{where}.")
            system.append({"type": "text", "text": text_of(m.get("content"), f"{where}.content")})
        elif role == "user":
            check_fields(m, frozenset({"role", "content"}), {}, f"{where}.")
            _append(out, "user", _user_content(m.get("content"), f"{where}.content"))
        elif role == "assistant":
            _append(out, "assistant", _assistant(m, where))
        elif role == "tool":
            check_fields(m, frozenset({"role", "content", "tool_call_id"}), {}, f"{where}.")
            if not isinstance(m.get("tool_call_id"), str):
                raise BadRequest(f"'{where}.tool_call_id' must be a string.", param=f"{where}.tool_call_id")
            _append(out, "user", [{"type": "tool_result", "tool_use_id": m["tool_call_id"],
                                   "content": text_of(m.get("content"), f"{where}.content")}])
        else:
            raise untranslatable(f"{where}.role", "only system, developer, user, assistant and tool messages map")
    return system, out


def _append(out: list[dict[str, Any]], role: str, content: str | list[dict[str, Any]]) -> None:
    """Consecutive turns of one role become one (tool results for parallel calls must
    share one user turn)."""
    if out and out[-1]["role"] == role:
        prev = out[-1]["content"]
        blocks = [{"type": "text", "text": prev}] if isinstance(prev, str) else prev
        blocks.extend([{"type": "text", "text": content}] if isinstance(content, str) else content)
        out[-1]["content"] = blocks
    else:
        out.append({"role": role, "content": content})


def _user_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"'{where}' must be a string or an array of content parts.", param=where)
    blocks = []
    for j, part in enumerate(content):
        w = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            check_fields(part, frozenset({"type", "text"}), {}, f"{w}.")
            blocks.append({"type": "text", "text": part.get("text")})
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            check_fields(part, frozenset({"type", "image_url"}), {}, f"{w}.")
            blocks.append(_image(part["image_url"], f"{w}.image_url"))
        else:
            raise untranslatable(w, "only text and image parts map to Anthropic")
    return blocks


def _image(image: dict[str, Any], where: str) -> dict[str, Any]:
    # OpenAI's detail changes how an image is tokenised; Anthropic has no such setting.
    check_fields(image, frozenset({"url"}), {"detail": ("auto",)}, f"{where}.")
    url = image.get("url")
    if isinstance(url, str) and url.startswith("data:") and ";base64," in url:
        media, data = url[5:].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    if isinstance(url, str) and url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise BadRequest(f"'{where}.url' must be an http(s) URL or a base64 data URL.", param=f"{where}.url")


def _assistant(m: dict[str, Any], where: str) -> list[dict[str, Any]]:
    check_fields(m, frozenset({"role", "content", "tool_calls"}), {}, f"{where}.")
    blocks: list[dict[str, Any]] = []
    if m.get("content") is not None:
        text = text_of(m["content"], f"{where}.content")
        if text or not m.get("tool_calls"):
            blocks.append({"type": "text", "text": text})
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise BadRequest(f"'{where}.tool_calls' must be an array.", param=f"{where}.tool_calls")
    for k, call in enumerate(calls):
        w = f"{where}.tool_calls[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            raise untranslatable(w, "only function calls map to Anthropic")
        check_fields(call, frozenset({"id", "type", "function"}), {}, f"{w}.")
        check_fields(fn, frozenset({"name", "arguments"}), {}, f"{w}.function.")
        if not isinstance(call.get("id"), str) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"'{w}' needs a string id and function.name.", param=w)
        blocks.append({"type": "tool_use", "id": call["id"], "name": fn["name"],
                       "input": json_object(fn.get("arguments"), f"{w}.function.arguments")})
    return blocks


def response(data: dict[str, Any], usage: Usage, slug: str) -> dict[str, Any]:
    content = data.get("content")
    if not isinstance(content, list):
        raise invalid_answer("no content")
    text: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind == "thinking":
            thinking.append(str(block.get("thinking") or ""))
        elif kind != "redacted_thinking":  # encrypted: nothing a client could read
            raise invalid_answer("a content block the chat format has no place for")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None,
                               "refusal": None}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "".join(thinking)  # DeepSeek's name for it, which clients read
    return {"id": data.get("id"), "object": "chat.completion", "created": int(time.time()), "model": slug,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH.get(str(data.get("stop_reason")), "stop")}],
            "usage": openai_usage(usage)}


class AnthropicToChat:
    """Anthropic stream events -> chat.completion.chunk events. Unknown event types are
    skipped (Anthropic may add some); an unknown kind of content is an error event."""

    __slots__ = ("_blocks", "_created", "_id", "_slug", "_tools", "_usage", "finished")

    def __init__(self, slug: str, wants_usage: bool) -> None:
        self._slug = slug
        self._usage = wants_usage
        self._id = "chatcmpl-tollway"
        self._created = int(time.time())
        self._blocks: dict[Any, int | None] = {}  # Anthropic block index -> tool call index (None: text)
        self._tools = 0
        self.finished = False  # message_delta's stop_reason came: the answer is whole, message_stop or not

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return chunk({"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                      "model": self._slug, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                        "finish_reason": finish}]})

    def convert(self, data: dict[str, Any]) -> bytes | None:
        kind = data.get("type")
        if kind == "content_block_delta":
            return self._delta(data)
        if kind == "message_start":
            message = data.get("message")
            if isinstance(message, dict) and isinstance(message.get("id"), str):
                self._id = message["id"]
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            return self._start(data)
        if kind == "message_delta":
            delta = data.get("delta")
            stop = delta.get("stop_reason") if isinstance(delta, dict) else None
            if stop is None or self.finished:
                return None
            self.finished = True
            return self._chunk({}, FINISH.get(str(stop), "stop"))
        if kind == "error":
            err = data.get("error")
            message = err.get("message") if isinstance(err, dict) else None
            raise UpstreamError(f"The model provider failed mid-stream: {message if isinstance(message, str) else ''}")
        return None  # ping, content_block_stop, and event types added after this was written

    def _start(self, data: dict[str, Any]) -> bytes | None:
        block = data.get("content_block")
        kind = block.get("type") if isinstance(block, dict) else None
        index = data.get("index")
        if kind == "tool_use":
            assert isinstance(block, dict)
            self._blocks[index] = k = self._tools
            self._tools += 1
            return self._chunk({"tool_calls": [{"index": k, "id": block.get("id"), "type": "function",
                                                "function": {"name": block.get("name"), "arguments": ""}}]})
        if kind in ("text", "thinking", "redacted_thinking"):
            assert isinstance(block, dict)
            self._blocks[index] = None
            text = block.get("text")
            return self._chunk({"content": text}) if isinstance(text, str) and text else None
        raise invalid_answer("a content block the chat format has no place for")

    def _delta(self, data: dict[str, Any]) -> bytes | None:
        delta = data.get("delta")
        kind = delta.get("type") if isinstance(delta, dict) else None
        if kind == "text_delta":
            assert isinstance(delta, dict)
            return self._chunk({"content": delta.get("text")})
        if kind == "input_json_delta":
            assert isinstance(delta, dict)
            k = self._blocks.get(data.get("index"))
            if k is None:
                raise invalid_answer("tool input for a block that is not a tool call")
            return self._chunk({"tool_calls": [{"index": k, "function": {"arguments": delta.get("partial_json")}}]})
        if kind == "thinking_delta":
            assert isinstance(delta, dict)
            return self._chunk({"reasoning_content": delta.get("thinking")})
        if kind == "signature_delta":
            return None  # opaque: only meaningful sent back to Anthropic
        raise invalid_answer("a kind of content the chat format has no place for")

    def finish(self, usage: Usage) -> bytes:
        out = [] if self.finished else [self._chunk({}, "stop")]
        if self._usage:
            out.append(chunk({"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                              "model": self._slug, "choices": [], "usage": openai_usage(usage)}))
        out.append(b"data: [DONE]")
        return b"\n\n".join(out)

    def error(self, exc: TollwayError) -> bytes:
        return render_sse(exc)[:-2]  # the relay adds the blank line
