"""Ollama's native API on `corejax serve`'s port: /api/generate, /api/chat, /api/embed (and the legacy
/api/embeddings); the model endpoints (/api/tags, /api/show, /api/ps, /api/pull, /api/version) are in
ollama_models.py.

Generation is a translation: an Ollama request becomes the OpenAI chat (or, raw: true, completions) body the
server's own path validates and runs (Server.openai_generation), and its completion or chunks become Ollama's
objects, streamed as NDJSON by default as Ollama does. Tools and tool calls translate both ways in their own
functions (ollama_tools, ollama_message, ollama_tool_calls), so they work wherever the OpenAI path does.
Errors are Ollama's {"error": "..."} with the HTTP status the OpenAI path chose."""

from __future__ import annotations

import contextlib
import datetime
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from corejax.server.ollama_models import NDJSON
from corejax.server.schema import ApiError, bad

# `server` is corejax.server.app's Server (not imported here: app imports this module to build its routes).


# Ollama's options and what corejax does with each. Mapped: sampling corejax honours, under OpenAI's names.
_MAPPED = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "seed": "seed",
           "stop": "stop", "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty"}
# Sampling corejax does not implement: accepted only at the value that turns it off, else refused (they change
# what is generated).
_OFF_ONLY = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0}
# Ignored: how llama.cpp runs under Ollama (threads, GPU layers, batch size, memory mapping), never what it
# generates. num_ctx and num_keep are here too: corejax runs each model with its whole context, and a prompt that
# does not fit gets a 400 instead of Ollama's silent truncation, so no answer differs from Ollama's with a
# num_ctx large enough for the request.
_PERFORMANCE = {"num_thread", "num_gpu", "main_gpu", "num_batch", "low_vram", "use_mmap", "use_mlock", "numa",
                "f16_kv", "vocab_only", "logits_all", "embedding_only", "num_gqa", "rope_frequency_base",
                "rope_frequency_scale", "num_ctx", "num_keep"}


def routes(server: Any) -> list[Route]:
    from corejax.server import ollama_models

    api = _Ollama(server)

    def route(path: str, name: str, handler: Any, method: str = "POST") -> Route:
        return Route(path, server.route(f"ollama_{name}", handler, error_response), methods=[method])

    return [route("/api/generate", "generate", api.generate), route("/api/chat", "chat", api.chat),
            route("/api/embed", "embed", api.embed), route("/api/embeddings", "embed", api.embeddings),
            *ollama_models.routes(server, route)]


def error_response(e: ApiError) -> Response:
    return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)


def timestamp() -> str:
    """Now as Ollama writes created_at: RFC 3339 in UTC."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def options(body: dict) -> dict:
    """Ollama's options (and num_predict) as OpenAI body fields; refuses those that change the output and
    that corejax cannot honour."""
    opts = body.get("options")
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise bad("options must be an object like {\"temperature\": 0.2, \"num_predict\": 64}", "options")
    out: dict[str, Any] = {}
    for name, value in opts.items():
        if value is None or name in _PERFORMANCE:
            continue
        if name in _MAPPED:
            out[_MAPPED[name]] = value
        elif name == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool) or value < -2 or value == 0:
                raise bad("options.num_predict must be a positive integer, or -1 (no limit)", "options")
            if value > 0:  # -1 (infinite) and -2 (fill the context): up to the server's limit
                out["max_tokens"] = value
        elif name == "repeat_last_n":
            if value not in (-1, 0) and opts.get("repeat_penalty", 1.0) != 1.0:
                raise bad("corejax applies repeat_penalty over the whole context: send options.repeat_last_n -1 "
                          "(or omit it)", "options")
        elif name == "penalize_newline":
            if value is not True and opts.get("repeat_penalty", 1.0) != 1.0:
                raise bad("corejax's repeat_penalty penalises newlines like any token; penalize_newline false is "
                          "not supported", "options")
        elif name in _OFF_ONLY:
            if value != _OFF_ONLY[name]:
                raise bad(f"options.{name} is not supported by corejax (it would change the output); omit it or "
                          f"send {_OFF_ONLY[name]}", "options")
        else:
            raise bad(f"options.{name} is not an option corejax knows; it may change the output, so it is "
                      "refused rather than ignored", "options")
    return out


def response_format(value: Any) -> dict | None:
    """Ollama's format ("json" or a JSON schema) as OpenAI's response_format."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise bad("format must be \"json\" or a JSON schema object", "format")


def ollama_tools(tools: Any) -> Any:
    """Ollama's tools are OpenAI's function tools already ({"type": "function", "function": {name, description,
    parameters}}); a function without a type gets it."""
    if not isinstance(tools, list):
        return tools  # the OpenAI path's validation answers it
    return [dict(t, type=t.get("type", "function")) if isinstance(t, dict) else t for t in tools]


def ollama_messages(messages: Any) -> Any:
    """Ollama's chat messages as OpenAI's: assistant tool_calls get ids and JSON-string arguments, and each tool
    message (which names its tool, tool_name) the id of the earliest unanswered call of that tool."""
    if not isinstance(messages, list):
        return messages
    out, unanswered = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)
            continue
        for field in ("images", "thinking"):
            if m.get(field):
                raise bad(f"messages[{i}].{field} is not supported by corejax (text models only)", "messages")
        msg = {k: v for k, v in m.items() if k not in ("images", "thinking", "tool_calls", "tool_name")}
        if m.get("tool_calls"):
            calls = []
            for j, call in enumerate(m["tool_calls"] if isinstance(m["tool_calls"], list) else [None]):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad(f"messages[{i}].tool_calls[{j}] must be {{\"function\": {{\"name\": ..., "
                              "\"arguments\": {...}}}}", "messages")
                cid = call.get("id") or f"call_{i}_{j}"
                args = fn.get("arguments", {})
                calls.append({"id": cid, "type": "function",
                              "function": {"name": fn["name"],
                                           "arguments": args if isinstance(args, str) else json.dumps(args)}})
                unanswered.append((fn["name"], cid))
            msg["tool_calls"] = calls
        if m.get("role") == "tool":
            name = m.get("tool_name")
            match = next((c for c in unanswered if name is None or c[0] == name), None)
            if match is not None:
                unanswered.remove(match)
                msg["tool_call_id"] = match[1]
        out.append(msg)
    return out


def ollama_tool_calls(calls: list[dict] | None) -> list[dict]:
    """OpenAI's tool_calls (arguments a JSON string) as Ollama's ({"function": {"name", "arguments": {...}}})."""
    out = []
    for c in calls or []:
        fn = c.get("function") or {}
        args = fn.get("arguments") or "{}"
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass  # a model's malformed arguments reach the client as the text it wrote
        out.append({"id": c.get("id"), "function": {"index": c.get("index", len(out)), "name": fn.get("name"),
                                                    "arguments": args}})
    return out


def ollama_logprobs(lp: dict | None) -> list[dict] | None:
    """OpenAI's logprobs (the chat form, or the completions form of raw: true) as Ollama's list of {token,
    logprob, top_logprobs}."""
    if not lp:
        return None
    if "content" in lp:
        return [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"],
                 "top_logprobs": [{"token": a["token"], "logprob": a["logprob"], "bytes": a["bytes"]}
                                  for a in t["top_logprobs"]]} for t in lp["content"] or []]
    return [{"token": tok, "logprob": p, "top_logprobs": [{"token": k, "logprob": v} for k, v in top.items()]}
            for tok, p, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])]


def _unloads(body: dict) -> bool:
    """keep_alive 0 (in any of its spellings): a request without a prompt unloads its model, as in Ollama."""
    return body.get("keep_alive") in (0, 0.0, "0", "0s", "0m", "0h")


def _done_reason(finish: str | None) -> str:
    return "length" if finish == "length" else "stop" if finish in ("stop", "tool_calls", None) else finish


def _stats(ctx: dict, timings: dict | None, finish: str | None) -> dict:
    """The final object's fields: done_reason and the counts and durations (nanoseconds) Ollama reports."""
    t = timings or {}
    ttft, total = t.get("time_to_first_token_s", 0.0), t.get("total_s", 0.0)
    return {"done": True, "done_reason": _done_reason(finish),
            "total_duration": int((time.perf_counter() - ctx["start"]) * 1e9),
            "load_duration": 0,  # a load is the model pool's, not timed per request
            "prompt_eval_count": t.get("prompt_tokens", 0), "prompt_eval_duration": int(ttft * 1e9),
            "eval_count": t.get("generated_tokens", 0), "eval_duration": int(max(total - ttft, 0.0) * 1e9)}


class _Ollama:
    def __init__(self, server: Any):
        self.server = server

    def _openai_body(self, body: dict, model: str) -> dict:
        for field in ("images", "context", "template", "suffix", "width", "height", "steps"):
            if body.get(field):
                raise bad(f"{field} is not supported by corejax's Ollama API (text models with their own chat "
                          "template only)", field)
        if body.get("think"):
            raise bad("think is not supported by corejax", "think")
        stream = body.get("stream")
        stream = True if stream is None else stream  # Ollama streams unless told not to
        if not isinstance(stream, bool):
            raise bad("stream must be true or false", "stream")
        out = {"model": model, "stream": stream, **options(body)}
        if body.get("keep_alive") is not None:  # the model pool's (corejax/server/models.py), Ollama's semantics
            out["keep_alive"] = body["keep_alive"]
        if body.get("logprobs") is not None:
            out["logprobs"] = body["logprobs"]
        if body.get("top_logprobs") is not None:
            out["top_logprobs"] = body["top_logprobs"]
        fmt = response_format(body.get("format"))
        if fmt is not None:
            out["response_format"] = fmt
        return out

    def _model_name(self, body: dict) -> str:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise bad("model is required (GET /api/tags lists the models of this server)", "model")
        return name.removesuffix(":latest")

    async def generate(self, request: Request, ctx: dict) -> Response:
        body = await self.server.read_body(request)
        name = self._model_name(body)
        openai_body = self._openai_body(body, name)
        prompt, system = body.get("prompt", ""), body.get("system")
        if not isinstance(prompt, str) or system is not None and not isinstance(system, str):
            raise bad("prompt and system must be strings", "prompt")
        if not prompt:  # Ollama's way to load (or, keep_alive 0, unload) a model
            return JSONResponse({"model": await self._load_or_unload(name, body, ctx), "created_at": timestamp(),
                                 "response": "", "done": True, "done_reason": "unload" if _unloads(body) else "load"})
        if body.get("raw"):
            if system:
                raise bad("system cannot be used with raw: true (the prompt is sent as it is)", "system")
            openai_body["prompt"] = prompt
            if openai_body.get("logprobs") is True:  # completions' form: the number of alternatives
                openai_body["logprobs"] = openai_body.pop("top_logprobs", 0)
            elif openai_body.get("logprobs") is False:
                openai_body.pop("logprobs")
            if "max_tokens" not in openai_body:
                openai_body["max_tokens"] = self.server.limits.max_tokens
            chat = False
        else:
            openai_body["messages"] = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            chat = True
        return await self._run(request, ctx, openai_body, chat, "response")

    async def chat(self, request: Request, ctx: dict) -> Response:
        body = await self.server.read_body(request)
        openai_body = self._openai_body(body, self._model_name(body))
        messages = body.get("messages")
        if messages == [] or messages is None:
            return JSONResponse({"model": await self._load_or_unload(openai_body["model"], body, ctx),
                                 "created_at": timestamp(), "message": {"role": "assistant", "content": ""},
                                 "done": True, "done_reason": "unload" if _unloads(body) else "load"})
        openai_body["messages"] = ollama_messages(messages)
        if body.get("tools"):
            openai_body["tools"] = ollama_tools(body["tools"])
        return await self._run(request, ctx, openai_body, True, "message")

    async def _load_or_unload(self, name: str, body: dict, ctx: dict) -> str:
        """keep_alive 0 unloads the model if it is loaded (once idle); otherwise it is loaded (or kept) with the
        request's keep_alive."""
        if _unloads(body):
            model_id = self.server._model_id(name)
            if model_id not in self.server.pool.allowed:
                await self.server.served_model(name, ctx)  # the 404 naming it and what is allowed
            self.server.pool.unload(model_id)
            ctx["model"] = model_id
            return model_id
        model = await self.server.served_model(name, ctx, body.get("keep_alive"))
        self.server.pool.release(model)  # idle at once: its keep_alive starts now
        return model.id

    async def _run(self, request: Request, ctx: dict, openai_body: dict, chat: bool, field: str) -> Response:
        out = await self.server.openai_generation(request, ctx, openai_body, chat=chat)
        model = ctx["model"]
        if isinstance(out, dict):
            c = out["choices"][0]
            obj = {"model": model, "created_at": timestamp()}
            if field == "message":
                obj["message"] = {"role": "assistant", "content": c["message"].get("content") or ""}
                if c["message"].get("tool_calls"):
                    obj["message"]["tool_calls"] = ollama_tool_calls(c["message"]["tool_calls"])
            else:
                obj["response"] = c["text"] if "text" in c else c["message"].get("content") or ""
            if c.get("logprobs"):
                obj["logprobs"] = ollama_logprobs(c["logprobs"])
            obj.update(_stats(ctx, out["timings"][0], c["finish_reason"]))
            return JSONResponse(obj)
        return StreamingResponse(self._lines(ctx, out, field), media_type=NDJSON)

    async def _lines(self, ctx: dict, chunks: AsyncIterator[dict], field: str) -> AsyncIterator[bytes]:
        model = ctx["model"]
        calls: dict[int, dict] = {}  # OpenAI streams a tool call in pieces; Ollama sends it whole
        async with contextlib.aclosing(chunks):
            async for c in chunks:
                if "error" in c:
                    yield _line({"error": c["error"]["message"]})
                    return
                if not c["choices"]:
                    continue
                ch = c["choices"][0]
                delta = ch.get("delta") or {}
                text = ch.get("text", delta.get("content")) or ""
                for tc in delta.get("tool_calls") or []:
                    slot = calls.setdefault(tc.get("index", 0), {"id": None, "function": {"name": "",
                                                                                           "arguments": ""}})
                    slot["id"] = tc.get("id") or slot["id"]
                    fn = tc.get("function") or {}
                    slot["function"]["name"] += fn.get("name") or ""
                    slot["function"]["arguments"] += fn.get("arguments") or ""
                logprobs = ollama_logprobs(ch.get("logprobs"))
                if ch.get("finish_reason") is None:
                    if text or logprobs:
                        yield _line(self._piece(model, field, text, logprobs))
                    continue
                last = self._piece(model, field, text, logprobs)
                if calls and field == "message":
                    last["message"]["tool_calls"] = ollama_tool_calls([calls[i] for i in sorted(calls)])
                last.update(_stats(ctx, c.get("timings"), ch["finish_reason"]))
                yield _line(last)

    @staticmethod
    def _piece(model: str, field: str, text: str, logprobs: list[dict] | None = None) -> dict:
        value: Any = {"role": "assistant", "content": text} if field == "message" else text
        out = {"model": model, "created_at": timestamp(), field: value, "done": False}
        if logprobs:
            out["logprobs"] = logprobs
        return out

    async def embed(self, request: Request, ctx: dict) -> Response:
        body = await self.server.read_body(request)
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise bad("input must be a string or a non-empty list of strings", "input")
        if body.get("dimensions") is not None:
            raise bad("dimensions is not supported: corejax returns the model's own embedding size", "dimensions")
        if body.get("truncate") is False:
            raise bad("truncate: false is not supported: corejax truncates inputs to the model's context",
                      "truncate")
        options(body)
        model, vectors, counts = await self.server.embed(self._model_name(body), texts, ctx, body.get("keep_alive"))
        return JSONResponse({"model": model.id, "embeddings": [[float(x) for x in v] for v in vectors],
                             "total_duration": int((time.perf_counter() - ctx["start"]) * 1e9),
                             "load_duration": 0, "prompt_eval_count": sum(counts)})

    async def embeddings(self, request: Request, ctx: dict) -> Response:
        """The legacy endpoint: one prompt, one embedding."""
        body = await self.server.read_body(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad("prompt must be a string", "prompt")
        options(body)
        _, vectors, _ = await self.server.embed(self._model_name(body), [prompt], ctx, body.get("keep_alive"))
        return JSONResponse({"embedding": [float(x) for x in vectors[0]]})


def _line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
