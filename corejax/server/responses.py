"""OpenAI's Responses API on `corejax serve`'s port: POST /v1/responses, stateless.

A translation into the server's chat path (Server.openai_generation) and back: `input` (a string or message,
function_call and function_call_output items), function `tools` and `tool_choice`, `instructions` (a system message), `max_output_tokens`, temperature, top_p, `text.format` (structured
output) and streaming (response.created, response.output_text.delta, ..., response.completed). The server keeps
no responses: `previous_response_id` and `store: true` are refused with a 400 (an omitted store, which OpenAI
reads as true, is read as false here: nothing is stored, and nothing generated depends on it)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from corejax.server import schema
from corejax.server.schema import bad

# `server` is corejax.server.app's Server (not imported here: app imports this module to build its routes).

# Fields with no effect on the text: accepted and not passed on.
_IGNORED = ("metadata", "user", "truncation", "service_tier", "safety_identifier",
            "prompt_cache_key", "include", "background")


def routes(server: Any) -> list[Route]:
    api = _Responses(server)
    return [Route("/v1/responses", server.route("responses", api.create), methods=["POST"])]


def responses_tools(tools: Any) -> Any:
    """The Responses API's function tools ({"type": "function", "name", "description", "parameters", "strict"})
    as chat's ({"type": "function", "function": {...}}); its built-in tools (web search, files, ...) refused."""
    if not isinstance(tools, list):
        return tools  # the chat path's validation answers it
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("name"), str):
            raise bad(f"tools[{i}] must be a function tool {{\"type\": \"function\", \"name\", \"parameters\"}}; "
                      "the Responses API's built-in tools are not available here", "tools")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                                     if t.get(k) is not None}})
    return out


def responses_tool_choice(choice: Any) -> Any:
    """"auto" | "none" | "required" as they are; {"type": "function", "name"} as chat's nested form."""
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def function_call_items(calls: list[dict] | None, status: str = "completed") -> list[dict]:
    """Chat's tool_calls as the Responses API's function_call output items."""
    return [{"type": "function_call", "id": f"fc_{c.get('id')}", "call_id": c.get("id"),
             "name": (c.get("function") or {}).get("name"), "arguments": (c.get("function") or {}).get("arguments"),
             "status": status} for c in calls or []]


def _input_messages(value: Any) -> list[dict]:
    """input (a string, or message, function_call and function_call_output items) as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad("input must be a string or a non-empty list of message items", "input")
    out: list[dict] = []
    for i, item in enumerate(value):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            continue
        if kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")})
            continue
        if kind != "message" or "role" not in item:
            raise bad(f"input[{i}] must be a message item {{\"role\": ..., \"content\": ...}}, a function_call "
                      "or a function_call_output", "input")
        content = item.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                    raise bad(f"input[{i}].content may hold only input_text and output_text parts", "input")
                parts.append({"type": "text", "text": part.get("text")})
            content = parts
        out.append({"role": item["role"], "content": content})
    return out


def _format(text: Any) -> dict | None:
    """text.format as the chat path's response_format."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None or isinstance(fmt, dict) and fmt.get("type") == "text":
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    raise bad("text.format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
              "\"name\": ..., \"schema\": {...}}", "text")


def openai_body(body: dict) -> dict:
    if body.get("previous_response_id") is not None:
        raise bad("previous_response_id is not supported: corejax's server keeps no responses; send the whole "
                  "conversation as input", "previous_response_id")
    if body.get("store") is True:
        raise bad("store: true is not supported: corejax's server keeps no responses; send store: false",
                  "store")
    if body.get("reasoning") not in (None, {}):
        raise bad("reasoning is not supported by corejax", "reasoning")
    messages = _input_messages(body.get("input"))
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise bad("instructions must be a string", "instructions")
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages, "stream": body.get("stream", False)}
    for ours, theirs in (("max_tokens", "max_output_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
        if body.get(theirs) is not None:
            out[ours] = body[theirs]
    if body.get("tools"):
        out["tools"] = responses_tools(body["tools"])
    if body.get("tool_choice") is not None:
        out["tool_choice"] = responses_tool_choice(body["tool_choice"])
    if body.get("parallel_tool_calls") is not None:  # the chat path checks it is a bool
        out["parallel_tool_calls"] = body["parallel_tool_calls"]
    fmt = _format(body.get("text"))
    if fmt is not None:
        out["response_format"] = fmt
    return out


class _Responses:
    def __init__(self, server: Any):
        self.server = server

    def _response(self, body: dict, rid: str, mid: str, ctx: dict, created: int, text: str | None,
                  finish: str | None, usage: dict | None, calls: list[dict] | None = None) -> dict:
        done = finish is not None
        status = "in_progress" if not done else "incomplete" if finish == "length" else "completed"
        output = [] if text is None else [{"type": "message", "id": mid, "status": status, "role": "assistant",
                                           "content": [{"type": "output_text", "text": text, "annotations": []}]}]
        output += function_call_items(calls)
        tools = body.get("tools") if isinstance(body.get("tools"), list) else []
        return {"id": rid, "object": "response", "created_at": created, "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
                "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                "model": ctx["model"], "output": output,
                "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
                "temperature": body.get("temperature"), "top_p": body.get("top_p"),
                "tool_choice": body.get("tool_choice") or "auto", "tools": tools, "text": {"format": {"type": "text"}}, "store": False, "metadata": {},
                "usage": None if usage is None else {
                    "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                    "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens_details": {"reasoning_tokens": 0}}}

    async def create(self, request: Request, ctx: dict) -> Response:
        body = await self.server.read_body(request)
        req = openai_body(body)
        if req["stream"]:
            req["stream_options"] = {"include_usage": True}
        out = await self.server.openai_generation(request, ctx, req, chat=True)
        rid, mid, created = schema.new_id("resp"), schema.new_id("msg"), schema.now()
        if isinstance(out, dict):
            c = out["choices"][0]
            text, calls = c["message"].get("content") or "", c["message"].get("tool_calls")
            return JSONResponse(self._response(body, rid, mid, ctx, created, text if text or not calls else None,
                                               c["finish_reason"], out["usage"], calls))
        return StreamingResponse(self._events(body, rid, mid, ctx, created, out), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _events(self, body: dict, rid: str, mid: str, ctx: dict, created: int,
                      chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
        seq = 0

        def event(kind: str, **data: Any) -> bytes:
            nonlocal seq
            seq += 1
            payload = {"type": kind, "sequence_number": seq - 1, **data}
            return f"event: {kind}\ndata: ".encode() + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"

        where = {"item_id": mid, "output_index": 0, "content_index": 0}
        async with contextlib.aclosing(chunks):  # closed however this stream ends
            yield event("response.created", response=self._response(body, rid, mid, ctx, created, None, None, None))
            yield event("response.in_progress", response=self._response(body, rid, mid, ctx, created, None, None, None))
            item = {"type": "message", "id": mid, "status": "in_progress", "role": "assistant", "content": []}
            yield event("response.output_item.added", output_index=0, item=item)
            yield event("response.content_part.added", **where, part={"type": "output_text", "text": "",
                                                                     "annotations": []})
            text, finish = "", None
            calls: dict[int, dict] = {}  # chat's tool call index -> the call so far (its arguments come in pieces)
            async for c in chunks:
                if "error" in c:
                    failed = self._response(body, rid, mid, ctx, created, text, "error", None)
                    failed.update(status="failed", error={"code": c["error"].get("code") or "server_error",
                                                          "message": c["error"]["message"]})
                    yield event("response.failed", response=failed)
                    return
                if not c["choices"]:
                    if c.get("usage"):
                        done = [calls[i] for i in sorted(calls)]
                        final = self._response(body, rid, mid, ctx, created, text, finish, c["usage"], done)
                        part = final["output"][0]["content"][0]
                        yield event("response.output_text.done", **where, text=text, logprobs=[])
                        yield event("response.content_part.done", **where, part=part)
                        yield event("response.output_item.done", output_index=0, item=final["output"][0])
                        for n, item in enumerate(final["output"][1:], 1):
                            yield event("response.function_call_arguments.done", item_id=item["id"],
                                        output_index=n, arguments=item["arguments"])
                            yield event("response.output_item.done", output_index=n, item=item)
                        kind = "response.incomplete" if finish == "length" else "response.completed"
                        yield event(kind, response=final)
                    continue
                ch = c["choices"][0]
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    text += piece
                    yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
                for tc in (ch.get("delta") or {}).get("tool_calls") or []:
                    index, fn = tc.get("index", 0), tc.get("function") or {}
                    if index not in calls:
                        calls[index] = {"id": tc.get("id"), "function": {"name": fn.get("name"), "arguments": ""}}
                        item = function_call_items([calls[index]], "in_progress")[0]
                        yield event("response.output_item.added", output_index=len(calls), item=item)
                    call = calls[index]
                    if fn.get("arguments"):
                        call["function"]["arguments"] += fn["arguments"]
                        yield event("response.function_call_arguments.delta", item_id=f"fc_{call['id']}",
                                    output_index=sorted(calls).index(index) + 1, delta=fn["arguments"])
                finish = ch.get("finish_reason") or finish
