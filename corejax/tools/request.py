"""A request's tools in OpenAI's shapes (tools, tool_choice, parallel_tool_calls, assistant tool_calls and tool
messages), validated, and what they make of the request: the messages and tools the chat template renders, the
grammar of a forced call, and the parser of the reply."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

from corejax.errors import InvalidParameterError
from corejax.tools.formats import ChatFormat, forced_grammar

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CHOICES = ("none", "auto", "required")


class ToolError(InvalidParameterError):
    """A malformed tools, tool_choice, parallel_tool_calls or tool message; `param` names the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _json(value: Any, what: str, param: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise ToolError(f"{what} must be JSON data ({str(e)[:120]})", param) from None


def _tool(tool: Any, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(
            tool.get("function"), dict):
        raise ToolError(f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": {{...}}}}}}',
                        "tools")
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolError(f"{where}.function.name must be 1 to 64 letters, digits, '_', '.' or '-'; got "
                        f"{json.dumps(name)[:80]}", "tools")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise ToolError(f"{where}.function.description must be a string", "tools")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ToolError(f"{where}.function.parameters must be a JSON schema object", "tools")
    _json(params, f"{where}.function.parameters", "tools")
    out = {"type": "function", "function": {"name": name}}
    for key in ("description", "parameters", "strict"):
        if fn.get(key) is not None:
            out["function"][key] = fn[key]
    return out


@dataclasses.dataclass(frozen=True)
class ToolRequest:
    """tools (OpenAI's tool objects), tool_choice ("none", "auto", "required" or a function's name) and
    parallel_tool_calls, validated."""

    tools: tuple[dict, ...]
    choice: str
    named: bool  # choice is a function's name
    parallel: bool

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t["function"]["name"] for t in self.tools)

    @property
    def active(self) -> bool:
        return bool(self.tools) and not (self.choice == "none" and not self.named)

    @property
    def forced(self) -> bool:
        return self.active and (self.named or self.choice == "required")

    @classmethod
    def of(cls, tools: Any = None, tool_choice: Any = None, parallel_tool_calls: Any = None) -> ToolRequest | None:
        if tools is None or tools == []:
            if tool_choice is not None and tool_choice != "none":
                raise ToolError("tool_choice needs tools: give the functions the model may call", "tool_choice")
            if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
                raise ToolError("parallel_tool_calls must be true or false", "parallel_tool_calls")
            return None
        if not isinstance(tools, (list, tuple)):
            raise ToolError('tools must be a list of {"type": "function", "function": {...}} objects', "tools")
        if len(tools) > MAX_TOOLS:
            raise ToolError(f"tools may hold at most {MAX_TOOLS} functions; got {len(tools)}", "tools")
        checked = tuple(_tool(t, i) for i, t in enumerate(tools))
        names = [t["function"]["name"] for t in checked]
        if len(set(names)) != len(names):
            raise ToolError("tools has two functions of the same name", "tools")
        named = False
        if tool_choice is None:
            choice = "auto"
        elif isinstance(tool_choice, str):
            if tool_choice not in CHOICES:
                raise ToolError(f"tool_choice must be 'none', 'auto', 'required' or {{\"type\": \"function\", "
                                f"\"function\": {{\"name\": ...}}}}; got {tool_choice!r}", "tool_choice")
            choice = tool_choice
        elif (isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function"
              and isinstance(tool_choice.get("function"), dict)
              and isinstance(tool_choice["function"].get("name"), str)):
            choice, named = tool_choice["function"]["name"], True
            if choice not in names:
                raise ToolError(f"tool_choice names the function {choice!r}, which is not in tools "
                                f"({', '.join(names)})", "tool_choice")
        else:
            raise ToolError('tool_choice must be a string or {"type": "function", "function": {"name": ...}}',
                            "tool_choice")
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise ToolError("parallel_tool_calls must be true or false", "parallel_tool_calls")
        return cls(checked, choice, named, True if parallel_tool_calls is None else parallel_tool_calls)

    @classmethod
    def pop(cls, kwargs: dict) -> ToolRequest | None:
        """The tool keywords of a generate/stream call, taken out of `kwargs` (the rest are sampling's)."""
        return cls.of(kwargs.pop("tools", None), kwargs.pop("tool_choice", None),
                      kwargs.pop("parallel_tool_calls", None))

    def grammar(self, fmt: ChatFormat) -> str | None:
        """The grammar of a forced reply (tool_choice "required" or named), else None."""
        if not self.forced:
            return None
        tools = [t for t in self.tools if t["function"]["name"] == self.choice] if self.named else list(self.tools)
        return forced_grammar(fmt, tools, self.parallel and fmt.parallel)


# ----------------------------------------------------------------------------------------------------
# Messages: assistant tool_calls and tool results, as templates read them


def _arguments(value: Any, where: str) -> dict | str:
    """A call's arguments as templates want them: an object (Qwen's and Llama's templates `tojson` it; OpenAI's
    clients send JSON text)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.strip() else {}
        except (ValueError, RecursionError):
            raise ToolError(f"{where}.function.arguments must be JSON text of an object; got {value[:80]!r}",
                            "messages") from None
        if isinstance(parsed, dict):
            return parsed
    raise ToolError(f"{where}.function.arguments must be a JSON object or JSON text of one", "messages")


def _calls(value: Any, i: int) -> list[dict]:
    if not isinstance(value, list):
        raise ToolError(f"messages[{i}].tool_calls must be a list of tool calls", "messages")
    out = []
    for j, call in enumerate(value):
        where = f"messages[{i}].tool_calls[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict) or not isinstance(
                call["function"].get("name"), str):
            raise ToolError(f'{where} must be {{"id": ..., "type": "function", "function": {{"name": ..., '
                            f'"arguments": ...}}}}', "messages")
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise ToolError(f"{where}.id must be a string", "messages")
        out.append({"id": call.get("id") or f"call_{i}_{j}", "type": "function",
                    "function": {"name": call["function"]["name"],
                                 "arguments": _arguments(call["function"].get("arguments"), where)}})
    return out


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise ToolError(f"{where}.content must be a string", "messages")


def chat_messages(messages: Sequence[dict], generic: bool) -> list[dict]:
    """`messages` with OpenAI's tool_calls and tool results checked and put as templates read them; for a
    template without tools (generic) as text: calls in <tool_call> blocks, results as user turns in
    <tool_response> blocks (the convention the generic system message teaches)."""
    out, names = [], {}
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = _calls(m["tool_calls"], i)
            names.update((c["id"], c["function"]["name"]) for c in calls)
            content = _text(m.get("content"), f"messages[{i}]")
            if generic:
                blocks = [f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}\n</tool_call>"
                          for c in calls]
                out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + blocks)})
            else:
                out.append({**m, "content": content, "tool_calls": calls})
        elif role == "tool":
            content = _text(m.get("content"), f"messages[{i}]")
            call_id = m.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise ToolError(f"messages[{i}].tool_call_id must be a string", "messages")
            if generic:
                out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
            else:
                name = m.get("name") if isinstance(m.get("name"), str) else names.get(call_id, "")
                out.append({"role": "tool", "content": content, "tool_call_id": call_id or "", "name": name})
        else:
            out.append(dict(m))
    return out


def generic_instructions(tools: Sequence[dict], parallel: bool) -> str:
    """The system text that teaches a model whose template knows no tools to call them (hermes blocks)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    many = " Write one block per call." if parallel else " Call at most one function."
    return ("You may call functions to help with the user's request. The functions, as JSON schemas:\n"
            f"<tools>\n{listed}\n</tools>\n"
            "To call a function, reply with only this, the arguments as a JSON object:\n"
            '<tool_call>\n{"name": "<function name>", "arguments": {<arguments>}}\n</tool_call>\n'
            f"{many} Results come back in <tool_response> blocks. If no function helps, answer normally.")


def with_system(messages: list[dict], text: str) -> list[dict]:
    """`text` added to the system message (a new one first when there is none)."""
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
