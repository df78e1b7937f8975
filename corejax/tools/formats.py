"""The tool-call formats of model families: how a chat template is recognised, how one call's text is read into
OpenAI's shape, and the grammar that forces a call (tool_choice "required" or a named function).

  hermes   Qwen2.5/Qwen3, Hermes 2/3, Granite 4 ...: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
           one block per call.
  llama3   Llama 3.1-3.3: the reply is one JSON object `{"name": ..., "parameters": {...}}`, after
           `<|python_tag|>` or alone (the tag is a control token, so it is usually not in the text).
  mistral  Mistral/Mixtral/Nemo: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (the marker is a control
           token too: a reply that is a JSON array of calls reads the same).
  generic  a template that knows no tools (SmolLM2's ChatML ...): corejax describes the tools in a system message
           and asks for hermes blocks, as llama.cpp's server does for such templates.

What a model writes is untrusted: a body that is not one of these shapes stays plain content."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

TOOL_FORMATS = ("hermes", "llama3", "mistral", "generic")
REASONING_FORMATS = ("think", "opened")  # the reply may open with <think>; the prompt opened it (DeepSeek-R1)
MAX_CALL_CHARS = 1 << 20  # one call's text; a longer one is content (a model looping inside a call)
MAX_CALLS = 64  # calls of one reply that are read; more stay content


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How a model's chat template takes tools and writes calls and reasoning (the worker's info carries it)."""

    tools: str = "generic"  # one of TOOL_FORMATS
    reasoning: str | None = None  # one of REASONING_FORMATS, or None: the template knows no <think>

    @property
    def template_takes_tools(self) -> bool:
        return self.tools != "generic"

    @property
    def parallel(self) -> bool:
        """Whether the format has several calls in one reply (Llama 3.1's template refuses more than one)."""
        return self.tools != "llama3"

    def to_wire(self) -> dict:
        return {"tools": self.tools, "reasoning": self.reasoning}

    @classmethod
    def from_wire(cls, value: Any) -> ChatFormat:
        """The worker's word, checked: anything but a known format name reads as the generic format."""
        if not isinstance(value, dict):
            return cls()
        tools = value.get("tools") if value.get("tools") in TOOL_FORMATS else "generic"
        reasoning = value.get("reasoning") if value.get("reasoning") in REASONING_FORMATS else None
        return cls(tools, reasoning)


def detect(template: str | None, generation_prompt: str | None = None) -> ChatFormat:
    """The format a chat template uses, from the markers its tool instructions and renderings hold;
    `generation_prompt`, a one-turn chat it rendered, says whether it opens the <think> block itself."""
    if not template:
        return ChatFormat()
    reasoning = "think" if "<think>" in template and "</think>" in template else None
    if reasoning and generation_prompt is not None and generation_prompt.rstrip().endswith("<think>"):
        reasoning = "opened"
    tools = "generic"
    if re.search(r"\btools\b", template):
        if "<tool_call>" in template and "<function=" not in template and "arg_key" not in template:
            tools = "hermes"
        elif "[TOOL_CALLS]" in template:
            tools = "mistral"
        elif "<|python_tag|>" in template or ("ipython" in template and '"parameters"' in template):
            tools = "llama3"
    return ChatFormat(tools, reasoning)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def read_call(value: Any, names: frozenset[str] | None) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of one decoded call object, or None when it is not a call of a known tool.
    The arguments may be under "arguments" or "parameters", as an object or as JSON text of one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    name = value["name"]
    if names is not None and name not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        args = _loads(args)
    if not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False)


def read_calls(text: str, names: frozenset[str] | None) -> list[tuple[str, str]] | None:
    """The calls in a body that holds one JSON object, several separated by ';' or newlines (Llama 3.x), or a
    JSON array of them (Mistral); None if any part is not a call."""
    text = text.strip()
    if not text or len(text) > MAX_CALL_CHARS:
        return None
    value = _loads(text)
    if value is None and text.startswith("{"):
        values, decoder, at = [], json.JSONDecoder(), 0
        while at < len(text):
            try:
                item, at = decoder.raw_decode(text, at)
            except (ValueError, RecursionError):
                return None
            values.append(item)
            while at < len(text) and text[at] in " \t\r\n;":
                at += 1
        value = values
    items = value if isinstance(value, list) else [value]
    if not items or len(items) > MAX_CALLS:
        return None
    calls = [read_call(v, names) for v in items]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# Forced calls: a grammar for llguidance (Lark with embedded JSON schemas)


def call_schema(tool: dict, arguments_key: str = "arguments") -> dict:
    from corejax.types.jsonschema_prep import (
        prepare,  # the same reading of a schema as response_format's
    )

    fn = tool["function"]
    params = prepare(fn.get("parameters") or {"type": "object"})  # e.g. only the listed properties
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, arguments_key: params},
            "required": ["name", arguments_key], "additionalProperties": False}


def forced_grammar(fmt: ChatFormat, tools: list[dict], parallel: bool) -> str:
    """A Lark grammar whose every sentence is a reply of tool calls (one, or with `parallel` one or more) of
    `tools` in the format's own syntax, each call's arguments valid against its tool's parameter schema."""
    key = "parameters" if fmt.tools == "llama3" else "arguments"
    one: dict = {"anyOf": [call_schema(t, key) for t in tools]} if len(tools) > 1 else call_schema(tools[0], key)
    options = {"x-guidance": {"whitespace_flexible": False}}  # '{"a": 1, "b": 2}': no room to loop on blanks
    if fmt.tools == "llama3":
        return f"start: %json {json.dumps({**one, **options})}"
    if fmt.tools == "mistral":  # [TOOL_CALLS] is a control token, which a grammar cannot write: the bare array
        array = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1}), **options}
        return f"start: %json {json.dumps(array)}"
    call = f'call: "<tool_call>\\n" %json {json.dumps({**one, **options})} "\\n</tool_call>"'
    return ('start: call ("\\n" call)*\n' if parallel else "start: call\n") + call
