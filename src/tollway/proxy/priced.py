"""What a request may ask for at the price configured for its model.

Why: the reservation must be the most a request can cost (pipeline.py), and the charge is
tokens times the model's configured prices (money.py). A request field or header that
makes the provider bill more per token, bill something other than tokens (searches,
containers), or spend tokens the body's size does not bound, breaks one or the other.
Each is refused with a 400 naming it (`unsupported_parameter`), before anything is held
or forwarded. docs/proxy.md lists them, with why.

Only top-level fields, tool entries, content parts and cache_control markers are looked
at, on the body already parsed: no second parse, and no walk into any text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tollway.errors import BadRequest
from tollway.providers.base import EMBEDDINGS, MESSAGES, RESPONSES

# Top-level fields that buy something the token prices do not cover, by wire format.
_OPENAI_FIELDS = {
    "web_search_options": "web search is billed per call",
    "audio": "audio output is priced apart from text",
    "prediction": "rejected prediction tokens are billed beyond the output bound",
    "models": "fallback models have prices of their own",
    "plugins": "provider plugins (web search, parsers) are billed apart",
    "provider": "provider routing can pick a host at a higher price",
    "search_parameters": "live search is billed per source",
    "search_settings": "search is billed apart",
    "compound_custom": "built-in tools are billed apart",
}
_ANTHROPIC_FIELDS = {
    "mcp_servers": "MCP tool results add input the request's size does not bound",
    "container": "code execution containers are billed by the hour",
    "context_management": "server-side context management needs a beta this gateway does not allow",
}
# field -> values that cannot raise the price; any other value is refused.
_OPENAI_VALUES = {"service_tier": frozenset({"auto", "default", "flex"})}
_ANTHROPIC_VALUES = {"service_tier": frozenset({"auto", "standard_only"}),
                     "inference_geo": frozenset({"global"}),
                     "speed": frozenset({"standard"})}
_OPENAI_TOOLS = frozenset({"function", "custom"})  # executed by the client, billed as tokens
# Responses tools the client executes (Codex's shell and patch tools); like Anthropic's
# client tools, each adds a fixed prompt of its own. Every other Responses tool (web_search,
# file_search, code_interpreter, computer_use_preview, image_generation, mcp, ...) is run
# and billed by the provider.
_RESPONSES_CLIENT_TOOLS = frozenset({"local_shell", "shell", "apply_patch"})
# Anthropic-defined tools the client executes; they add a fixed prompt of their own.
_ANTHROPIC_CLIENT_TOOLS = ("bash_", "text_editor_", "computer_", "memory_")
# anthropic-beta flags that change neither the price per token nor what bounds the tokens.
ANTHROPIC_BETAS = frozenset({
    "interleaved-thinking-2025-05-14", "fine-grained-tool-streaming-2025-05-14",
    "token-efficient-tools-2025-02-19", "prompt-caching-2024-07-31", "output-128k-2025-02-19",
    "max-tokens-3-5-sonnet-2024-07-15", "computer-use-2024-10-22", "computer-use-2025-01-24",
    "computer-use-2025-11-24", "structured-outputs-2025-11-13", "effort-2025-11-24",
})
_BETA_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
# Prompt tokens a provider adds that are not in the body: the tool-use system prompt when
# any tool is declared, and the fixed prompt of each Anthropic-defined client tool
# (computer use, the largest, documents about 1,250).
TOOLS_PROMPT_TOKENS = 1_024
CLIENT_TOOL_PROMPT_TOKENS = 2_048
# Content parts whose token count their bytes do not bound: images (a small image by URL,
# or a large flat one compressed to a few KB, costs thousands of tokens), documents,
# files by id, audio (OpenAI's input_audio is also priced apart: refused outright).
_MEDIA = frozenset({"image_url", "image", "document", "file", "input_file", "input_image",
                    "container_upload", "computer_screenshot"})
_REFUSED_PARTS = {"input_audio": "audio input is priced apart from text"}


@dataclass(frozen=True, slots=True)
class Extra:
    prompt_tokens: int  # prompt the provider adds beyond what the body's size bounds
    media: str | None  # where the first input not bounded by its bytes is, if any


def refuse(param: str, why: str) -> BadRequest:
    return BadRequest(f"'{param}' is not accepted by this gateway: {why}, and this gateway charges only the "
                      f"token prices configured for the model.", code="unsupported_parameter", param=param)


def check_headers(headers: dict[str, str]) -> None:
    betas = headers.get("anthropic-beta")
    if betas:
        for flag in betas.split(","):
            flag = flag.strip()
            if flag and flag not in ANTHROPIC_BETAS:
                # Named back only if it looks like a beta name: error messages quote no client text.
                named = f"the beta '{flag}'" if _BETA_NAME.fullmatch(flag) else "a beta flag"
                raise refuse("anthropic-beta", f"{named} can change the price or what bounds it")


def check_body(endpoint: str, body: dict[str, Any]) -> Extra:
    """Refuse what changes the price; return what the reservation must add for the rest."""
    if endpoint == EMBEDDINGS:
        return Extra(0, None)
    anthropic = endpoint == MESSAGES
    fields, values = (_ANTHROPIC_FIELDS, _ANTHROPIC_VALUES) if anthropic else (_OPENAI_FIELDS, _OPENAI_VALUES)
    refused = body.keys() & fields.keys()  # one set operation: most bodies have none of them
    if refused:
        name = min(refused)
        raise refuse(name, fields[name])
    for name, allowed in values.items():
        value = body.get(name)
        # A list or an object is no allowed value (and cannot be looked up in a set).
        if value is not None and (not isinstance(value, str) or value not in allowed):
            raise refuse(name, f"only {', '.join(sorted(allowed))} are accepted")
    modalities = body.get("modalities")
    if modalities is not None and not (isinstance(modalities, list) and all(m == "text" for m in modalities)):
        raise refuse("modalities", "only text output is priced")
    responses = endpoint == RESPONSES
    extra = _tools(body.get("tools"), anthropic, responses) or (TOOLS_PROMPT_TOKENS if body.get("functions") else 0)
    media = _items(body.get("input")) if responses else _media(body.get("messages"), anthropic)
    if anthropic:
        system = body.get("system")
        if isinstance(system, list):
            for i, block in enumerate(system):
                if isinstance(block, dict) and "cache_control" in block:  # the path only when it may be named
                    _cache_ttl(block, f"system[{i}]")
        _cache_ttl(body, "")
    return Extra(extra, media)


def _tools(tools: Any, anthropic: bool, responses: bool = False) -> int:
    if not isinstance(tools, list) or not tools:
        return 0
    extra = TOOLS_PROMPT_TOKENS
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if anthropic:
            if isinstance(tool, dict) and "cache_control" in tool:
                _cache_ttl(tool, f"tools[{i}]")
            if kind is None or kind == "custom":
                continue
            if isinstance(kind, str) and kind.startswith(_ANTHROPIC_CLIENT_TOOLS):
                extra += CLIENT_TOOL_PROMPT_TOKENS
                continue
        elif isinstance(kind, str) and kind in _OPENAI_TOOLS:
            continue
        elif responses and isinstance(kind, str) and kind in _RESPONSES_CLIENT_TOOLS:
            extra += CLIENT_TOOL_PROMPT_TOKENS
            continue
        raise refuse(f"tools[{i}].type", "tools the provider runs are billed apart from tokens")
    return extra


def _media(messages: Any, anthropic: bool, name: str = "messages") -> str | None:
    """Refuse the content parts that change the price; return where the first one whose
    bytes do not bound its tokens is, if any. A plain text part costs one lookup: the
    path to a part is spelled out only for a part that needs it."""
    found = None
    if not isinstance(messages, list):
        return None
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict) and (part.get("type") != "text" or "cache_control" in part):
                if _needs_look(part, anthropic):
                    media = _part(part, f"{name}[{i}].content[{j}]", anthropic)
                    found = found or media
                inner = part.get("content")
                if isinstance(inner, list):  # Anthropic tool_result blocks carry parts of their own
                    for k, sub in enumerate(inner):
                        if isinstance(sub, dict) and _needs_look(sub, anthropic):
                            media = _part(sub, f"messages[{i}].content[{j}].content[{k}]", anthropic)
                            found = found or media
    return found


def _items(items: Any) -> str | None:
    """The Responses `input` items: content parts of messages as `_media`, parts in a tool
    output's list, and encrypted content (reasoning or compaction items passed back): an
    opaque blob whose bytes do not bound the tokens it stands for."""
    found = _media(items, False, "input")
    if not isinstance(items, list):
        return found
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        if item.get("encrypted_content") is not None:
            found = found or f"input[{i}].encrypted_content"
        output = item.get("output")
        if isinstance(output, dict):  # a computer_call_output's screenshot
            output = [output]
        if isinstance(output, list):
            for j, part in enumerate(output):
                if isinstance(part, dict) and _needs_look(part, False):
                    media = _part(part, f"input[{i}].output[{j}]", False)
                    found = found or media
    return found


def _needs_look(part: dict[str, Any], anthropic: bool) -> bool:
    """Whether `_part` can refuse the part or report it: only then is its path spelled out
    (a conversation of tool_use/tool_result blocks has hundreds of parts that need neither)."""
    kind = part.get("type")
    if not isinstance(kind, str):  # no part type Tollway prices (and a list cannot be looked up)
        return anthropic and "cache_control" in part
    return kind in _REFUSED_PARTS or kind in _MEDIA or (anthropic and "cache_control" in part)


def _part(part: dict[str, Any], where: str, anthropic: bool) -> str | None:
    kind = part.get("type")
    if not isinstance(kind, str):
        kind = None
    if kind in _REFUSED_PARTS:
        raise refuse(where, _REFUSED_PARTS[kind])
    if anthropic:
        _cache_ttl(part, where)
    return where if kind in _MEDIA and not _bounded_text(part) else None


def _bounded_text(part: dict[str, Any]) -> bool:
    """An Anthropic document given as plain text: its bytes bound its tokens as any text."""
    source = part.get("source")
    return isinstance(source, dict) and source.get("type") in ("text", "content")


def _cache_ttl(block: dict[str, Any], where: str) -> None:
    marker = block.get("cache_control")
    if isinstance(marker, dict) and marker.get("ttl", "5m") != "5m":
        name = f"{where}.cache_control.ttl" if where else "cache_control.ttl"
        raise refuse(name, "cache writes kept longer than 5 minutes cost more than the configured write price")
