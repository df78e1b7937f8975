"""OpenAI's request and response JSON for /v1/completions, /v1/chat/completions and /v1/embeddings: requests
become Session keyword arguments, results become the objects (and stream chunks) OpenAI's clients read.

Field names and shapes follow OpenAI's API reference. Omitted sampling fields take corejax's defaults (those of
llama.cpp's server: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05); llama.cpp's and vLLM's extras top_k,
min_p and repetition_penalty are accepted too. Unknown fields are ignored, as vLLM and llama.cpp do, except
those that would change what is generated and that corejax cannot honour (logit_bias, functions, ...): those
are refused with a 400, never silently dropped. Tools (tools, tool_choice, parallel_tool_calls, assistant
tool_calls and tool messages) are corejax/tools/'s: their shapes are this module's internal currency, so other
APIs translate into them."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

from corejax.errors import InvalidParameterError
from corejax.tools import ToolError, ToolRequest, chat_messages
from corejax.types.options import MAX_LOGPROBS
from corejax.types.results import GenerationResult, TokenLogprob
from corejax.types.constraints import Constraint

MAX_CHOICES = 16  # n: each choice is one request of the continuous batch
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# Fields that change what is generated and that corejax does not implement: refused, not ignored.
_UNSUPPORTED = {
    "functions": "function calls are not supported",
    "function_call": "function calls are not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
}


@dataclasses.dataclass
class GenerationRequest:
    """One /v1/completions or /v1/chat/completions request, validated and in corejax's terms."""

    chat: bool
    model: str | None
    prompts: list[str] | None  # completions: one choice group per prompt
    messages: list[dict] | None  # chat
    sampling: dict[str, Any]  # Session.stream_chunks keyword arguments, without the seed
    seed: int | None
    n: int
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # alternatives per token when logprobs are on, else None
    echo: bool = False  # completions: each choice's text starts with its prompt
    suffix: str | None = None  # completions: fill in the middle between each prompt and this (server/fim.py)
    shown_prompts: list[str] | None = None  # the prompts as given, where the model's (FIM) prompts differ

    def echoed(self, index: int) -> str:
        """The text that choice `index` starts with: its prompt with echo, else nothing."""
        return (self.shown_prompts or self.prompts or [""])[index // self.n] if self.echo else ""

    def choices(self) -> list[tuple[int, str | None, dict[str, Any]]]:
        """(choice index, prompt, sampling) of every choice: prompts times n. With a seed, choice j of a prompt
        samples with seed + j, so n choices differ from one another and each is reproducible."""
        out = []
        for p, prompt in enumerate(self.prompts or [None]):
            for j in range(self.n):
                kw = dict(self.sampling)
                if self.seed is not None:
                    kw["seed"] = (self.seed + j) % 2**64
                out.append((p * self.n + j, prompt, kw))
        return out


MAX_DEPTH = 64  # nesting of arrays and objects in a request body (a JSON schema's included)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes) -> dict:
    """The request's JSON object, checked so that no later step meets what it cannot take: nesting deeper than
    MAX_DEPTH (JSON's own parser recurses; Python raises RecursionError near 1,000 levels), NaN or Infinity
    (Python's json reads them, JSON does not have them), and strings with an unpaired UTF-16 surrogate (valid
    JSON escapes, but no UTF-8 encodes them: the tokenizer would fail)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise bad(f"the request body is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _check_values(body)
    return body


def _check_values(body: dict) -> None:
    stack: list[tuple[Any, int, str, str | None]] = [(body, 1, "the request body", None)]  # value, depth, where, field
    while stack:
        value, depth, where, field = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise bad(f"{where} holds an unpaired UTF-16 surrogate, which no UTF-8 text can carry",
                              field) from None
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise bad(f"the request body is nested too deeply (more than {MAX_DEPTH} levels)", field)
        if isinstance(value, dict):
            for key, item in value.items():
                inner = key if field is None else f"{where}.{key}"
                stack.append((key, depth, f"a key of {where}", field or key))
                stack.append((item, depth + 1, inner, field or key))
        else:
            stack.extend((item, depth + 1, f"{where}[{i}]", field) for i, item in enumerate(value))


def _typed(body: dict, name: str, types: tuple, what: str) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
        raise bad(f"{name} must be {what}; got {json.dumps(value)[:80]}", name)
    return value


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = _typed(body, name, (int,), f"an integer in [{lo}, {hi}]")
    if value is not None and not lo <= value <= hi:
        raise bad(f"{name} must be an integer in [{lo}, {hi}]; got {value}", name)
    return value


def _number(body: dict, name: str) -> float | None:
    return _typed(body, name, (int, float), "a number")


def generation_request(body: dict, *, chat: bool, max_tokens_limit: int) -> GenerationRequest:
    """Validates an OpenAI completions (chat=False) or chat completions request body."""
    for name, why in _UNSUPPORTED.items():
        value = body.get(name)
        if value in (None, False, {}, []):
            continue
        raise bad(f"{why} by corejax's server", name)
    model = _typed(body, "model", (str,), "a model id (GET /v1/models lists them)")
    prompts = messages = None
    if chat:
        messages = _messages(body.get("messages"))
    else:
        prompts = _prompts(body.get("prompt"))

    sampling: dict[str, Any] = {}
    max_tokens = _int(body, "max_completion_tokens", 1, 2**31) if chat else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, 2**31)
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise bad(f"max_tokens {max_tokens} is over this server's limit of {max_tokens_limit} "
                  "(corejax serve --max-tokens)", "max_tokens")
    sampling["max_tokens"] = max_tokens or (max_tokens_limit if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS,
                                                                                max_tokens_limit))
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = _number(body, name)
        if value is not None:
            sampling[name] = value
    top_k = _int(body, "top_k", -2**31, 2**31 - 1)
    if top_k is not None:  # llama.cpp's server reads top_k <= 0 as off, as corejax's 0
        sampling["top_k"] = max(top_k, 0)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop must be a non-empty string or a list of non-empty strings", "stop")
        sampling["stop"] = stop
    if body.get("ignore_eos") is not None:
        sampling["ignore_eos"] = _typed(body, "ignore_eos", (bool,), "true or false")

    constraint = _constraint(body)
    if constraint is not None:
        sampling["constraint"] = constraint
    if chat:
        sampling.update(_tools(body))
    elif any(body.get(name) is not None for name in ("tools", "tool_choice", "parallel_tool_calls")):
        raise bad("tools are for /v1/chat/completions; /v1/completions takes a plain prompt", "tools")
    top_logprobs = _logprobs(body, chat)
    if top_logprobs is not None:
        sampling["logprobs"] = top_logprobs
    logit_bias = _logit_bias(body)
    if logit_bias:
        sampling["logit_bias"] = logit_bias
    echo, suffix = _echo_suffix(body, chat, top_logprobs)
    n = _int(body, "n", 1, MAX_CHOICES)
    stream = _typed(body, "stream", (bool,), "true or false") or False
    options = _typed(body, "stream_options", (dict,), "an object like {\"include_usage\": true}") or {}
    if options and not stream:
        raise bad("stream_options is only allowed when stream is true", "stream_options")
    return GenerationRequest(
        chat=chat, model=model, prompts=prompts, messages=messages, sampling=sampling,
        seed=_int(body, "seed", -(2**63), 2**64 - 1), n=n or 1, stream=stream,
        include_usage=bool(options.get("include_usage")), top_logprobs=top_logprobs, echo=echo, suffix=suffix)


def _logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's {"token id": bias in [-100, 100]}; whether the ids are in the vocabulary: check_vocab."""
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad("logit_bias must be an object mapping token ids (as strings) to biases in [-100, 100]",
                  "logit_bias")
    out = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise bad(f"logit_bias keys must be token ids (non-negative integers, as strings); got {key!r}",
                      "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise bad(f"logit_bias[{key!r}] must be a number in [-100, 100] (-100 bans the token, 100 forces it); "
                      f"got {json.dumps(bias)[:40]}", "logit_bias")
        out[int(key)] = float(bias)
    return out


def check_vocab(req: GenerationRequest, vocab_size: int | None, model: str) -> None:
    """The request's logit_bias ids are in the model's vocabulary (the worker checks again)."""
    bias = req.sampling.get("logit_bias") or {}
    outside = sorted(t for t in bias if vocab_size is not None and t >= vocab_size)
    if outside:
        raise bad(f"logit_bias names token id {outside[0]}, outside the vocabulary of {model} (ids 0 to "
                  f"{vocab_size - 1})", "logit_bias")


def _echo_suffix(body: dict, chat: bool, top_logprobs: int | None) -> tuple[bool, str | None]:
    """echo and suffix: fields of /v1/completions only (OpenAI's chat API has neither)."""
    echo = _typed(body, "echo", (bool,), "true or false") or False
    suffix = _typed(body, "suffix", (str,), "a string (the text after the gap to fill in)")
    if chat:
        for name, value in (("echo", echo), ("suffix", suffix)):
            if value:
                raise bad(f"{name} is a field of /v1/completions; chat completions have none", name)
        return False, None
    if echo and top_logprobs is not None:
        raise bad("echo with logprobs would return the prompt tokens' logprobs, which corejax's server does not "
                  "compute; drop logprobs or echo", "echo")
    return echo, suffix


# Structured output (corejax/serving/structured.py): OpenAI's response_format, the request fields vLLM (guided_*) and
# llama.cpp's server (json_schema, grammar) take for the same thing, and corejax's own names (regex, choice).
_CONSTRAINT_FIELDS = {"response_format": "response_format", "guided_json": "response_format",
                      "json_schema": "response_format", "guided_regex": "regex", "guided_choice": "choice",
                      "guided_grammar": "grammar", "grammar": "grammar", "regex": "regex", "choice": "choice"}


def _constraint(body: dict) -> Constraint | None:
    given = [name for name in _CONSTRAINT_FIELDS if body.get(name) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise bad(f"give one of {', '.join(given)}, not several", given[1])
    name = given[0]
    value = body[name]
    if name in ("guided_json", "json_schema"):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise bad(f"{name} is not valid JSON ({e})", name) from None
        value = {"type": "json_schema", "json_schema": {"schema": value}}
    try:
        return Constraint.from_options(**{_CONSTRAINT_FIELDS[name]: value})
    except InvalidParameterError as e:
        raise bad(str(e), name) from None


def _tools(body: dict) -> dict[str, Any]:
    """tools, tool_choice and parallel_tool_calls, checked here (a 400 naming the field) and passed on as the
    Session's keywords of the same names."""
    try:
        ToolRequest.of(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    except ToolError as e:
        raise bad(str(e), e.param) from None
    return {name: body[name] for name in ("tools", "tool_choice", "parallel_tool_calls") if body.get(name) is not None}


def _logprobs(body: dict, chat: bool) -> int | None:
    """The number of alternatives per token, or None with logprobs off. Chat: logprobs (bool) with
    top_logprobs (0-20); completions: logprobs (an integer, the alternatives)."""
    if not chat:
        return _int(body, "logprobs", 0, MAX_LOGPROBS)
    on = _typed(body, "logprobs", (bool,), "true or false")
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not on:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if on else None


def _prompts(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise bad("prompts given as token ids are not supported; send the text", "prompt")
    raise bad("prompt must be a string or a non-empty list of strings", "prompt")


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string role", "messages")
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for the system role
        if role not in ("system", "user", "assistant", "tool"):
            raise bad(f"messages[{i}] has role {m['role']!r}; corejax's server takes system, developer, user, "
                      "assistant and tool messages", "messages")
        if role == "assistant" and m.get("tool_calls"):  # content may be null beside tool calls
            content = "" if m.get("content") is None else _content(m["content"], i)
            out.append({"role": role, "content": content, "tool_calls": m["tool_calls"]})
        elif role == "tool":
            out.append({"role": role, "content": _content(m.get("content"), i), "tool_call_id": m.get("tool_call_id"),
                        **({"name": m["name"]} if m.get("name") is not None else {})})
        else:
            out.append({"role": role, "content": _content(m.get("content"), i)})
    try:
        chat_messages(out, generic=False)  # checks the tool calls' and results' shapes
    except ToolError as e:
        raise bad(str(e), e.param) from None
    return out


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or a list of text parts (OpenAI's content-part form)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content may hold only text parts ({{\"type\": \"text\", \"text\": ...}})",
                          "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")


def embedding_inputs(body: dict) -> list[str]:
    value = body.get("input")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise bad("input must be a string or a non-empty list of strings (token-id inputs are not supported)",
                  "input")
    if body.get("encoding_format") not in (None, "float", "base64"):
        raise bad("encoding_format must be 'float' or 'base64'", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad("dimensions is not supported: corejax returns the model's own embedding size", "dimensions")
    return value


# ---------------------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(lps: tuple[TokenLogprob, ...]) -> dict:
    return {"content": [{"token": lp.text, "logprob": lp.logprob, "bytes": _bytes(lp.text),
                         "top_logprobs": [{"token": t, "logprob": p, "bytes": _bytes(t)}
                                          for t, (_, p) in zip(lp.top_text, lp.top)]} for lp in lps],
            "refusal": None}


def completion_logprobs(lps: tuple[TokenLogprob, ...], offset: int = 0) -> dict:
    """The legacy completions form; text_offset counts characters from the start of the generated text."""
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.text)
    return {"tokens": [lp.text for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [dict(zip(lp.top_text, (p for _, p in lp.top))) for lp in lps], "text_offset": offsets}


def choice(req: GenerationRequest, index: int, result: GenerationResult) -> dict:
    lps = result.logprobs if req.top_logprobs is not None else None
    if req.chat:
        message: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
        if result.tool_calls:
            message.update(content=result.text or None, tool_calls=list(result.tool_calls))
        if result.reasoning_content is not None:
            message["reasoning_content"] = result.reasoning_content
        return {"index": index, "message": message,
                "logprobs": None if lps is None else chat_logprobs(lps), "finish_reason": result.finish_reason}
    return {"index": index, "text": req.echoed(index) + result.text,
            "logprobs": None if lps is None else completion_logprobs(lps),
            "finish_reason": result.finish_reason}


def timings(result: GenerationResult) -> dict:
    """corejax's Timings of a generation (an extra field, as llama.cpp's server sends "timings"; OpenAI's
    clients ignore it)."""
    return dataclasses.asdict(result.timings)


def completion(req: GenerationRequest, rid: str, model: str, fingerprint: str,
               results: list[tuple[int, GenerationResult]]) -> dict:
    prompt_tokens = sum(len(r.prompt_tokens) for i, r in results if i % req.n == 0)  # each prompt once
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": now(),
            "model": model, "system_fingerprint": fingerprint,
            "choices": [choice(req, i, r) for i, r in sorted(results, key=lambda x: x[0])],
            "usage": usage(prompt_tokens, sum(len(r.tokens) for _, r in results)),
            "timings": [timings(r) for _, r in sorted(results, key=lambda x: x[0])]}


def chunk(req: GenerationRequest, rid: str, created: int, model: str, fingerprint: str, choices: list[dict]) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created,
           "model": model, "system_fingerprint": fingerprint, "choices": choices}
    if req.include_usage:
        out["usage"] = None  # OpenAI sends null on every chunk but the last, which carries the usage alone
    return out


def delta_choice(req: GenerationRequest, index: int, text: str, lps: tuple[TokenLogprob, ...],
                 finish_reason: str | None, offset: int = 0, first: bool = False, tool_calls: tuple = (),
                 reasoning: str = "") -> dict:
    """One choice of a stream chunk; a chat's delta may carry complete tool calls (each with its index, as
    OpenAI's clients accumulate them) and reasoning_content."""
    logprobs = None
    if req.top_logprobs is not None and lps:
        logprobs = chat_logprobs(lps) if req.chat else completion_logprobs(lps, offset)
    if req.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        if reasoning:
            delta["reasoning_content"] = reasoning
        if tool_calls:
            delta["tool_calls"] = list(tool_calls)
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def sse(data: Any) -> bytes:
    """One server-sent event as OpenAI sends it: `data: <json>` and a blank line."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
