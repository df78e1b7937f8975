"""Anthropic's Messages API on `corejax serve`'s port: POST /v1/messages and /v1/messages/count_tokens.

A translation: a Messages request becomes the OpenAI chat body the server's own path validates and runs
(Server.openai_generation), and its completion or chunks become a Message or Anthropic's event stream
(message_start, content_block_start / _delta / _stop, message_delta, message_stop). Tools translate both ways
in their own functions (anthropic_tools, anthropic_tool_choice, anthropic_messages, tool_use_blocks).
Errors are Anthropic's {"type": "error", "error": {"type", "message"}}; the API key may come as x-api-key.

Anthropic's SDK (2.x) no longer types temperature, top_p and top_k; they are honoured when sent (extra_body=).
With stop_sequences the chat path is asked for each token's text (logprobs, no alternatives): the generated
tokens past the text say whether a stop sequence (stop_reason "stop_sequence", and which) or the end of the
turn ended it, which a finish_reason of "stop" does not."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from corejax.server import schema
from corejax.server.schema import ApiError, bad

# `server` is corejax.server.app's Server (not imported here: app imports this module to build its routes).

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                529: "overloaded_error"}
_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "stop": "end_turn"}


def routes(server: Any) -> list[Route]:
    api = _Messages(server)
    return [Route("/v1/messages", server.route("anthropic_messages", api.messages, error_response),
                  methods=["POST"]),
            Route("/v1/messages/count_tokens", server.route("anthropic_count_tokens", api.count_tokens,
                                                            error_response), methods=["POST"])]


def error_body(e: ApiError) -> dict:
    kind = _ERROR_TYPES.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def error_response(e: ApiError) -> Response:
    return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


def _text(content: Any, where: str) -> str:
    """A system prompt or tool result: a string or a list of text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                         and isinstance(b.get("text"), str) for b in content):
        return "".join(b["text"] for b in content)
    raise bad(f"{where} must be a string or a list of text blocks ({{\"type\": \"text\", \"text\": ...}})", where)


def anthropic_tools(tools: Any) -> list[dict]:
    """Anthropic's client tools ({name, description, input_schema}) as OpenAI's function tools."""
    if not isinstance(tools, list):
        raise bad("tools must be a list of {\"name\", \"description\", \"input_schema\"} objects", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or t.get("type") not in (None, "custom"):
            raise bad(f"tools[{i}] must be a client tool {{\"name\", \"description\", \"input_schema\"}}; "
                      "Anthropic's server tools are not available here", "tools")
        fn = {"name": t["name"], "parameters": t.get("input_schema", {"type": "object"})}
        if t.get("description") is not None:
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def anthropic_tool_choice(choice: Any) -> tuple[Any, bool | None]:
    """(OpenAI's tool_choice, parallel_tool_calls) of Anthropic's {"type": auto | any | tool | none}."""
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise bad("tool_choice must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"tool\", \"name\": "
                  "...} or {\"type\": \"none\"}", "tool_choice")
    kind = choice["type"]
    openai_choice: Any = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise bad("tool_choice {\"type\": \"tool\"} needs the tool's name", "tool_choice")
        openai_choice = {"type": "function", "function": {"name": choice["name"]}}
    parallel = None if choice.get("disable_parallel_tool_use") is None else not choice["disable_parallel_tool_use"]
    return openai_choice, parallel


def anthropic_messages(messages: Any) -> list[dict]:
    """Anthropic's messages (content a string or blocks: text, tool_use, tool_result) as OpenAI's: tool_use
    blocks become the assistant's tool_calls, tool_result blocks "tool" messages."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {\"role\": \"user\" | \"assistant\", \"content\": ...}",
                  "messages")
    out: list[dict] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad(f"messages[{i}] must have role \"user\" or \"assistant\"", "messages")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise bad(f"messages[{i}].content must be a string or a list of content blocks", "messages")
        texts, calls = [], []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and m["role"] == "assistant":
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input", {}))}})
            elif kind == "tool_result" and m["role"] == "user":
                result = _text(block.get("content", ""), f"messages[{i}].content[{j}].content")
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": f"[error] {result}" if block.get("is_error") else result})
            else:
                raise bad(f"messages[{i}].content[{j}] is a {kind!r} block, which corejax cannot take (text "
                          "models: text, tool_use and tool_result blocks)", "messages")
        if texts or calls:
            msg: dict = {"role": m["role"], "content": "".join(texts)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def tool_use_blocks(calls: list[dict] | None) -> list[dict]:
    """OpenAI's tool_calls as Anthropic's tool_use blocks (input: the arguments' JSON, parsed)."""
    blocks = []
    for c in calls or []:
        fn = c.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = {"_raw": fn.get("arguments")}  # a model's malformed arguments, kept for the client to see
        blocks.append({"type": "tool_use", "id": c.get("id"), "name": fn.get("name"), "input": args})
    return blocks


def openai_body(body: dict, *, count_only: bool = False) -> dict:
    """The OpenAI chat body of a Messages request."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required (GET /v1/models lists the models of this server)", "model")
    max_tokens = body.get("max_tokens")
    if not count_only and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise bad("max_tokens is required: a positive integer", "max_tokens")
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        raise bad("extended thinking is not supported by corejax", "thinking")
    messages = anthropic_messages(body.get("messages"))
    if body.get("system") is not None:
        messages.insert(0, {"role": "system", "content": _text(body["system"], "system")})
    out: dict[str, Any] = {"model": model, "messages": messages, "stream": body.get("stream", False)}
    if not count_only:
        out["max_tokens"] = max_tokens
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                         ("stop", "stop_sequences")):
        if body.get(theirs) is not None:
            out[ours] = body[theirs]
    if out.get("stop") and not count_only:
        out["logprobs"], out["top_logprobs"] = True, 0  # the tokens' text, to tell which stop ended it
    config = body.get("output_config")
    if config is not None:
        out.update(_output_config(config))
    if body.get("tools"):
        out["tools"] = anthropic_tools(body["tools"])
    if body.get("tool_choice") is not None:
        out["tool_choice"], parallel = anthropic_tool_choice(body["tool_choice"])
        if parallel is not None:
            out["parallel_tool_calls"] = parallel
    return out  # metadata (a user id) and service_tier change nothing generated: not passed on


def _output_config(config: Any) -> dict:
    """output_config: its format (a JSON schema) as the chat path's structured output; effort refused."""
    if not isinstance(config, dict):
        raise bad("output_config must be an object like {\"format\": {\"type\": \"json_schema\", \"schema\": "
                  "{...}}}", "output_config")
    if config.get("effort") is not None:
        raise bad("output_config.effort is not supported by corejax (its models have no effort setting)",
                  "output_config")
    fmt = config.get("format")
    if fmt is None:
        return {}
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad("output_config.format must be {\"type\": \"json_schema\", \"schema\": {...}}", "output_config")
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}}


def stop_reason(finish: str | None, text: str, token_texts: list[str], stops: Any) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence): a finish of "stop" is a stop sequence when the tokens generated past the
    text begin with one (the text ends where the stop sequence began)."""
    if finish == "stop" and isinstance(stops, list) and token_texts:
        tail = "".join(token_texts)
        tail = tail[len(text):] if tail.startswith(text) else ""
        for s in sorted((s for s in stops if isinstance(s, str) and s), key=len, reverse=True):
            if tail.startswith(s):
                return "stop_sequence", s
    return _STOP_REASONS.get(finish or "stop", "end_turn"), None


def _token_texts(logprobs: dict | None) -> list[str]:
    return [t["token"] for t in (logprobs or {}).get("content") or []]


class _Messages:
    def __init__(self, server: Any):
        self.server = server

    async def messages(self, request: Request, ctx: dict) -> Response:
        body = await self.server.read_body(request)
        out = await self.server.openai_generation(request, ctx, openai_body(body), chat=True)
        mid = schema.new_id("msg").replace("-", "_")
        if not isinstance(out, dict):
            return StreamingResponse(self._events(ctx, mid, out, body.get("stop_sequences")),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        c = out["choices"][0]
        text = c["message"].get("content") or ""
        content = [{"type": "text", "text": text}] if text else []
        content += tool_use_blocks(c["message"].get("tool_calls"))
        reason, sequence = stop_reason(c["finish_reason"], text, _token_texts(c.get("logprobs")),
                                       body.get("stop_sequences"))
        return JSONResponse({"id": mid, "type": "message", "role": "assistant", "model": ctx["model"],
                             "content": content, "stop_reason": reason, "stop_sequence": sequence,
                             "usage": {"input_tokens": out["usage"]["prompt_tokens"],
                                       "output_tokens": out["usage"]["completion_tokens"]}})

    async def _events(self, ctx: dict, mid: str, chunks: AsyncIterator[dict], stops: Any) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(chunks):  # closed however this stream ends
            yield _event("message_start", {"message": {
                "id": mid, "type": "message", "role": "assistant", "model": ctx["model"], "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})
            index, open_kind = -1, None  # the content block being streamed: its index and type
            tools: dict[int, int] = {}  # OpenAI's tool call index -> its block's index
            text, token_texts = "", []
            async for c in chunks:
                if "error" in c:
                    yield _event("error", error_body(ApiError(500, c["error"]["message"])))
                    return
                if not c["choices"]:
                    continue
                ch = c["choices"][0]
                delta = ch.get("delta") or {}
                token_texts += _token_texts(ch.get("logprobs"))
                text += delta.get("content") or ""
                if delta.get("content"):
                    if open_kind != "text":
                        if open_kind is not None:
                            yield _event("content_block_stop", {"index": index})
                        index, open_kind = index + 1, "text"
                        yield _event("content_block_start", {"index": index,
                                                             "content_block": {"type": "text", "text": ""}})
                    yield _event("content_block_delta", {"index": index, "delta": {"type": "text_delta",
                                                                                   "text": delta["content"]}})
                for tc in delta.get("tool_calls") or []:
                    fn = tc.get("function") or {}
                    if tc.get("index", 0) not in tools:
                        if open_kind is not None:
                            yield _event("content_block_stop", {"index": index})
                        index, open_kind = index + 1, "tool_use"
                        tools[tc.get("index", 0)] = index
                        yield _event("content_block_start", {"index": index, "content_block": {
                            "type": "tool_use", "id": tc.get("id"), "name": fn.get("name"), "input": {}}})
                    if fn.get("arguments"):
                        yield _event("content_block_delta", {"index": index, "delta": {
                            "type": "input_json_delta", "partial_json": fn["arguments"]}})
                if ch.get("finish_reason") is not None:
                    if open_kind is not None:
                        yield _event("content_block_stop", {"index": index})
                    t = c.get("timings") or {}
                    reason, sequence = stop_reason(ch["finish_reason"], text, token_texts, stops)
                    yield _event("message_delta", {
                        "delta": {"stop_reason": reason, "stop_sequence": sequence},
                        "usage": {"input_tokens": t.get("prompt_tokens", 0),
                                  "output_tokens": t.get("generated_tokens", 0)}})
        yield _event("message_stop", {})

    async def count_tokens(self, request: Request, ctx: dict) -> Response:
        """The prompt's tokens under the model's own chat template, which the worker renders: counted by a
        one-token greedy generation (its prefill is what a request with these messages would run)."""
        body = await self.server.read_body(request)
        req = dict(openai_body(body, count_only=True), max_tokens=1, temperature=0, stream=False)
        out = await self.server.openai_generation(request, ctx, req, chat=True)
        return JSONResponse({"input_tokens": out["usage"]["prompt_tokens"]})


def _event(kind: str, data: dict) -> bytes:
    payload = {"type": kind, **data}
    return f"event: {kind}\ndata: ".encode() + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"
