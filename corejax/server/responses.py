"""OpenAI's Responses API on `corejax serve`'s port: POST /v1/responses, stateless.

A translation into the server's chat path (Server.openai_generation) and back: `input` (a string or message
items), `instructions` (a system message), `max_output_tokens`, temperature, top_p, `text.format` (structured
output) and streaming (response.created, response.output_text.delta, ..., response.completed). The server keeps
no responses: `previous_response_id` and `store: true` are refused with a 400 (an omitted store, which OpenAI
reads as true, is read as false here: nothing is stored, and nothing generated depends on it)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from corejax.server import schema
from corejax.server.schema import bad

if TYPE_CHECKING:
    from corejax.server.app import Server

# Fields with no effect on the text: accepted and not passed on.
_IGNORED = ("metadata", "user", "truncation", "parallel_tool_calls", "service_tier", "safety_identifier",
            "prompt_cache_key", "include", "background")


def routes(server: Server) -> list[Route]:
    api = _Responses(server)
    return [Route("/v1/responses", server.route("responses", api.create), methods=["POST"])]


def _input_messages(value: Any) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad("input must be a string or a non-empty list of message items", "input")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or item.get("type", "message") != "message" or "role" not in item:
            raise bad(f"input[{i}] must be a message item {{\"role\": ..., \"content\": ...}} (function calls and "
                      "other items are not supported)", "input")
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
    for ours, theirs in (("max_tokens", "max_output_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("tools", "tools"), ("tool_choice", "tool_choice")):
        if body.get(theirs) is not None:
            out[ours] = body[theirs]
    fmt = _format(body.get("text"))
    if fmt is not None:
        out["response_format"] = fmt
    return out


class _Responses:
    def __init__(self, server: Server):
        self.server = server

    def _response(self, body: dict, rid: str, mid: str, ctx: dict, created: int, text: str | None,
                  finish: str | None, usage: dict | None) -> dict:
        done = finish is not None
        status = "in_progress" if not done else "incomplete" if finish == "length" else "completed"
        output = [] if text is None else [{"type": "message", "id": mid, "status": status, "role": "assistant",
                                           "content": [{"type": "output_text", "text": text, "annotations": []}]}]
        return {"id": rid, "object": "response", "created_at": created, "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
                "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                "model": ctx["model"], "output": output, "parallel_tool_calls": False,
                "temperature": body.get("temperature"), "top_p": body.get("top_p"), "tool_choice": "auto",
                "tools": [], "text": {"format": {"type": "text"}}, "store": False, "metadata": {},
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
            return JSONResponse(self._response(body, rid, mid, ctx, created, c["message"]["content"] or "",
                                               c["finish_reason"], out["usage"]))
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
        yield event("response.created", response=self._response(body, rid, mid, ctx, created, None, None, None))
        yield event("response.in_progress", response=self._response(body, rid, mid, ctx, created, None, None, None))
        item = {"type": "message", "id": mid, "status": "in_progress", "role": "assistant", "content": []}
        yield event("response.output_item.added", output_index=0, item=item)
        yield event("response.content_part.added", **where, part={"type": "output_text", "text": "",
                                                                 "annotations": []})
        text, finish = "", None
        async with contextlib.aclosing(chunks):
            async for c in chunks:
                if "error" in c:
                    failed = self._response(body, rid, mid, ctx, created, text, "error", None)
                    failed.update(status="failed", error={"code": c["error"].get("code") or "server_error",
                                                          "message": c["error"]["message"]})
                    yield event("response.failed", response=failed)
                    return
                if not c["choices"]:
                    if c.get("usage"):
                        final = self._response(body, rid, mid, ctx, created, text, finish, c["usage"])
                        part = final["output"][0]["content"][0]
                        yield event("response.output_text.done", **where, text=text, logprobs=[])
                        yield event("response.content_part.done", **where, part=part)
                        yield event("response.output_item.done", output_index=0, item=final["output"][0])
                        kind = "response.incomplete" if finish == "length" else "response.completed"
                        yield event(kind, response=final)
                    continue
                ch = c["choices"][0]
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    text += piece
                    yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
                finish = ch.get("finish_reason") or finish
