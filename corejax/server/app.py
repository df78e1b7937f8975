"""The ASGI application of `corejax serve`: OpenAI's endpoints over one Session (one sandboxed worker) per model.

Every request of a model goes to that model's Session, whose worker batches concurrent generations together
(continuous batching): the server adds no queue of its own beyond a limit on requests in flight. A stream ends
in the worker as soon as its client goes away (Session.astream_chunks), which frees its KV pages."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from corejax import errors
from corejax.types.results import GenerationResult
from corejax.server import fim, http_errors, schema
from corejax.server.metrics import CONTENT_TYPE, Metrics
from corejax.server.models import ModelPool
from corejax.server.schema import ApiError, GenerationRequest
from corejax.server.streams import Choices as _Choices, ChunkStream as _ChunkStream, sse as _sse
from corejax.client.session import Session
from corejax.version import __version__

log = logging.getLogger("corejax.server")


@dataclasses.dataclass
class ServerLimits:
    max_body_bytes: int = 4 << 20
    max_tokens: int = 4096  # the most tokens one choice may generate (and the chat default)
    max_queue: int = 256  # requests in flight per model; more are answered 429
    api_key: str | None = None
    shutdown_grace_s: float = 10.0  # at SIGINT/SIGTERM, streams run this long, then end with an error event


class ServedModel:
    """One model the server answers for: its Session and what its worker can do."""

    def __init__(self, model_id: str, session: Session):
        self.id = model_id
        self.session = session
        self.info = info = session.info()
        self.generates = "kv_pages_total" in info  # an encoder embeds and classifies but has no KV pool
        self.created = int(time.time())
        key = f"{__version__}:{info.get('name')}:{info.get('weights')}:{info.get('kernel_isa')}"
        self.fingerprint = "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]
        self.in_flight = 0


class Server:
    """The models, limits and metrics one application serves; `app` is the Starlette application."""

    def __init__(self, models: list[ServedModel], limits: ServerLimits, pool: ModelPool | None = None):
        self.pool = pool if pool is not None else ModelPool({}, None)  # None: only the models given here
        for m in models:
            self.pool.add_loaded(m)
        if not self.pool.allowed:
            raise ValueError("a server needs at least one model")
        self.started = int(time.time())
        self.models = self.pool.loaded  # the loaded ones (corejax/server/models.py loads and unloads the rest)
        self.limits = limits
        self.metrics = Metrics()
        self.drain_deadline: float | None = None  # set when a shutdown signal arrives
        self.last_activity = time.monotonic()  # for --idle-exit: the last time a request began or ended
        routes = [
            Route("/health", self._route("health", self.health), methods=["GET"]),
            Route("/metrics", self._route("metrics", self.prometheus), methods=["GET"]),
            Route("/v1/models", self._route("models", self.list_models), methods=["GET"]),
            Route("/v1/models/{model_id:path}", self._route("models", self.get_model), methods=["GET"]),
            Route("/v1/completions", self._route("completions", self.completions), methods=["POST"]),
            Route("/v1/chat/completions", self._route("chat", self.chat_completions), methods=["POST"]),
            Route("/v1/embeddings", self._route("embeddings", self.embeddings), methods=["POST"]),
        ]
        # The other APIs on the same port, each a translation into and out of the OpenAI path above.
        from corejax.server import anthropic, extras, ollama, responses

        for api in (ollama, anthropic, responses, extras):
            routes += api.routes(self)
        self.app = Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed})

    def idle_for(self) -> float:
        """Seconds since the last request ended, 0 while any is in flight."""
        if any(m.in_flight for m in self.models.values()):
            return 0.0
        return time.monotonic() - self.last_activity

    def begin_drain(self) -> None:
        """A shutdown signal: streams still running after the grace period end with a final error event."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.limits.shutdown_grace_s

    # --- plumbing: auth, errors, metrics and the access log around every endpoint --------------------------

    def _route(self, endpoint: str, handler: Callable[[Request, dict], Awaitable[Response]],
               error: Callable[[ApiError], Response] | None = None):
        """The handler with auth, errors (in OpenAI's shape, or `error`'s: each API answers in its own), metrics
        and the access log around it."""
        error = error or _error_response

        async def route(request: Request) -> Response:
            start = time.perf_counter()
            self.last_activity = time.monotonic()
            ctx: dict[str, Any] = {"endpoint": endpoint, "start": start, "model": "-", "prompt_tokens": 0,
                                   "completion_tokens": 0}
            try:
                if endpoint != "health":
                    self._authorize(request)
                response = await handler(request, ctx)
            except ApiError as e:
                response = error(e)
            except Exception as e:
                log.exception("internal error in %s", request.url.path)
                response = error(ApiError(500, f"internal server error ({type(e).__name__})",
                                          type="server_error"))
            if isinstance(response, StreamingResponse):
                return response  # its stream logs the request when it ends (_log_stream)
            self._log(request, ctx, response.status_code)
            return response

        return route

    def _authorize(self, request: Request) -> None:
        """--api-key, the same on every endpoint but /health: 'Authorization: Bearer <key>' (OpenAI's and
        Ollama's clients, given headers) or 'x-api-key: <key>' (Anthropic's)."""
        key = self.limits.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer":
            token = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>' "
                                "(or 'x-api-key: <key>')",
                           type="invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def _log(self, request: Request, ctx: dict, status: int) -> None:
        elapsed = time.perf_counter() - ctx["start"]
        endpoint, model = ctx["endpoint"], ctx["model"]
        self.metrics.requests.labels(model, endpoint, str(status)).inc()
        if endpoint not in ("health", "metrics", "models"):
            self.metrics.duration.labels(model, endpoint).observe(elapsed)
        client = f"{request.client.host}:{request.client.port}" if request.client else "-"
        log.info('%s "%s %s" %d model=%s prompt_tokens=%d completion_tokens=%d %.3fs', client, request.method,
                 request.url.path, status, model, ctx["prompt_tokens"], ctx["completion_tokens"], elapsed)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        if request.url.path.startswith("/api/"):
            from corejax.server.ollama import error_response

            return error_response(ApiError(404, f"no route {request.method} {request.url.path}"))
        return _error_response(ApiError(404, f"no route {request.method} {request.url.path}; the API is under /v1",
                                        code="not_found"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        if request.url.path.startswith("/api/"):
            from corejax.server.ollama import error_response

            return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))
        return _error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    async def _body(self, request: Request) -> dict:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is over this server's limit of {limit} bytes")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise ApiError(413, f"the request body is over this server's limit of {limit} bytes")
        return schema.parse_body(bytes(raw))

    def _model_id(self, name: Any) -> str:
        if name is not None and not isinstance(name, str):
            raise schema.bad("model must be a model id (a string; GET /v1/models lists them)", "model")
        if name is None or name == "":
            name = self.pool.default_id()
            if name is None:
                raise schema.bad(f"model is required; this server has {', '.join(self.pool.allowed)}", "model")
        return name

    async def _model(self, name: Any, ctx: dict, keep_alive: Any = None) -> ServedModel:
        """The request's model, loaded (corejax/server/models.py); admit the request right after, with no await
        in between, so that it cannot be evicted first."""
        model = await self.pool.get(self._model_id(name), keep_alive)
        ctx["model"] = model.id
        return model

    @contextlib.contextmanager
    def _admitted(self, model: ServedModel):
        """Counts a request in flight for its model; over the limit it is refused with 429 and Retry-After."""
        if model.in_flight >= self.limits.max_queue:
            raise ApiError(429, f"{model.id} has {model.in_flight} requests in flight, this server's limit "
                                "(corejax serve --max-queue); retry shortly", type="rate_limit_exceeded",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        model.in_flight += 1
        self.metrics.in_flight.labels(model.id).inc()
        try:
            yield
        finally:
            model.in_flight -= 1
            self.metrics.in_flight.labels(model.id).dec()
            self.last_activity = time.monotonic()
            self.pool.release(model)  # starts its keep_alive once idle

    # The plumbing the other APIs' modules (ollama.py, anthropic.py, responses.py, extras.py) share.
    route = _route
    log_request = _log
    read_body = _body
    served_model = _model
    admitted = _admitted

    # --- endpoints ------------------------------------------------------------------------------------------

    async def health(self, request: Request, ctx: dict) -> Response:
        return JSONResponse({"status": "draining" if self.drain_deadline is not None else "ok",
                             "models": list(self.models)})

    async def prometheus(self, request: Request, ctx: dict) -> Response:
        for model in list(self.models.values()):  # a copy: models load and unload meanwhile
            with contextlib.suppress(errors.CorejaxError):  # a worker restarting: the gauges keep their values
                self.metrics.observe_load(model.id, await asyncio.to_thread(model.session.info))
        return Response(self.metrics.text(), media_type=CONTENT_TYPE)

    def _model_card(self, model_id: str) -> dict:
        """OpenAI's model object plus llama.cpp's router field status.value: loaded, loading or unloaded (one
        a request may load); a loaded one's status also has size_bytes and expires_at (ModelPool.ps)."""
        m = self.models.get(model_id)
        status = {"value": self.pool.status(model_id), **self.pool.usage(model_id)}
        created = m.created if m else self.started
        # Anthropic's ModelInfo fields too (type, display_name, created_at): one listing serves both clients.
        return {"id": model_id, "object": "model", "created": created, "owned_by": "corejax", "status": status,
                "type": "model", "display_name": model_id,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))}

    async def list_models(self, request: Request, ctx: dict) -> Response:
        """OpenAI's list ({"object": "list", "data"}) and Anthropic's page (data, has_more, first_id, last_id)."""
        data = [self._model_card(m["id"]) for m in self.pool.listing()]
        return JSONResponse({"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    async def get_model(self, request: Request, ctx: dict) -> Response:
        model_id = self._model_id(request.path_params["model_id"])
        if model_id not in self.pool.allowed:
            await self.pool.get(model_id)  # the 404 naming it and what is allowed
        ctx["model"] = model_id
        return JSONResponse(self._model_card(model_id))

    async def embed(self, name: Any, texts: list[str], ctx: dict,
                    keep_alive: Any = None) -> tuple[ServedModel, Any, list[int]]:
        """(the model, its vectors [n, D], each text's token count) of texts embedded by the model `name`,
        admitted and counted as every request is (the other APIs' embedding and rerank endpoints use it)."""
        model = await self._model(name, ctx, keep_alive)
        with self._admitted(model):
            try:
                vectors = await asyncio.to_thread(model.session.embed, texts)
                counts = await asyncio.to_thread(lambda: [len(model.session.tokenize(t)) for t in texts])
            except errors.CorejaxError as e:
                raise _api_error(e) from None
        ctx["prompt_tokens"] = sum(counts)
        self.metrics.prompt_tokens.labels(model.id).inc(sum(counts))
        return model, vectors, counts

    async def embeddings(self, request: Request, ctx: dict) -> Response:
        body = await self._body(request)
        texts = schema.embedding_inputs(body)
        model, vectors, counts = await self.embed(body.get("model"), texts, ctx, body.get("keep_alive"))
        b64 = body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(np.asarray(v, "<f4").tobytes()).decode() if b64 else
                 [float(x) for x in v]} for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": model.id,
                             "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}})

    async def completions(self, request: Request, ctx: dict) -> Response:
        return await self._generate(request, ctx, chat=False)

    async def chat_completions(self, request: Request, ctx: dict) -> Response:
        return await self._generate(request, ctx, chat=True)

    async def _generate(self, request: Request, ctx: dict, *, chat: bool) -> Response:
        out = await self.openai_generation(request, ctx, await self._body(request), chat=chat)
        if isinstance(out, dict):
            return JSONResponse(out)
        return StreamingResponse(_sse(out), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def openai_generation(self, request: Request, ctx: dict, body: dict, *,
                                chat: bool) -> dict | AsyncIterator[dict]:
        """An OpenAI completions (chat=False) or chat completions body through the server's generation path:
        the completion object, or with stream: true an async iterator of the chunk objects (an {"error": ...}
        object last when the stream fails after it began). Errors before the stream begins raise ApiError.
        Ollama's, Anthropic's and the Responses API are translations into and out of these (ollama.py, ...)."""
        req = schema.generation_request(body, chat=chat, max_tokens_limit=self.limits.max_tokens)
        model = await self._model(req.model, ctx, body.get("keep_alive"))
        if not model.generates:
            raise schema.bad(f"{model.id} is an embedding model: it cannot generate text; use /v1/embeddings",
                             "model")
        rid = schema.new_id("chatcmpl" if chat else "cmpl")
        admitted = self._admitted(model)
        admitted.__enter__()
        try:
            req = await _completion_extras(model, req)
        except BaseException:
            admitted.__exit__(None, None, None)
            raise
        streams = _Choices(model.session, req)
        try:
            if req.stream:
                first = await streams.first_events()  # errors before the first token get their HTTP status
                return self._chunks(request, ctx, req, rid, model, streams, first, admitted)
            results = await streams.results(request)
        except BaseException:
            streams.cancel()
            admitted.__exit__(None, None, None)
            raise
        admitted.__exit__(None, None, None)
        for index, result in results:
            self._count(model, ctx, req, index, result)
        return schema.completion(req, rid, model.id, model.fingerprint, results)

    def _count(self, model: ServedModel, ctx: dict, req: GenerationRequest, index: int,
               result: GenerationResult) -> None:
        ctx["completion_tokens"] += len(result.tokens)
        if index % req.n == 0:  # each prompt once, however many choices it has (OpenAI's usage counts so)
            ctx["prompt_tokens"] += len(result.prompt_tokens)
        self.metrics.generation_tokens.labels(model.id).inc(len(result.tokens))
        self.metrics.prompt_tokens.labels(model.id).inc(len(result.prompt_tokens) - result.timings.cached_prompt_tokens)
        if result.tokens:
            self.metrics.ttft.labels(model.id).observe(result.timings.time_to_first_token_s)
        if len(result.tokens) > 1:
            self.metrics.decode_rate.labels(model.id).observe(result.timings.decode_tokens_per_s)

    def _chunks(self, request: Request, ctx: dict, req: GenerationRequest, rid: str, model: ServedModel,
                streams: _Choices, first: list, admitted: Any) -> _ChunkStream:
        state = {"status": 499, "finished": False}  # 499: nginx's "client closed request", until the stream ends

        def finish() -> None:  # once, and synchronous: it may run in a cancelled scope, where no await may run
            if not state["finished"]:
                state["finished"] = True
                streams.cancel()  # the workers stop these generations at once and free their KV pages
                admitted.__exit__(None, None, None)
                self._log(request, ctx, state["status"])

        return _ChunkStream(self._chunk_items(state, finish, ctx, req, rid, model, streams, first), finish)

    async def _chunk_items(self, state: dict, finish: Callable[[], None], ctx: dict, req: GenerationRequest,
                           rid: str, model: ServedModel, streams: _Choices, first: list) -> AsyncIterator[dict]:
        created = schema.now()

        def event(choices: list[dict]) -> dict:
            return schema.chunk(req, rid, created, model.id, model.fingerprint, choices)

        status = 200
        offsets = dict.fromkeys(range(streams.count), 0)  # completions' text_offset, per choice
        results: dict[int, GenerationResult] = {}
        try:
            if req.chat:
                for index in range(streams.count):
                    yield event([schema.delta_choice(req, index, "", (), None, first=True)])
            elif req.echo:  # completions' echo: each choice's prompt comes first
                for index in range(streams.count):
                    yield event([schema.delta_choice(req, index, req.echoed(index), (), None)])
            async for index, item in streams.events(first, self._remaining):
                if isinstance(item, Exception):  # a failure after the headers went out: a final error event
                    error = item if isinstance(item, ApiError) else _api_error(item)
                    status = error.status
                    yield error.body()
                    break
                if item.result is not None:
                    results[index] = item.result
                    self._count(model, ctx, req, index, item.result)
                    yield dict(schema.chunk(req, rid, created, model.id, model.fingerprint,
                                            [schema.delta_choice(req, index, "", (), item.result.finish_reason)]),
                               timings=schema.timings(item.result))
                    continue
                if item.text or item.logprobs or item.tool_calls or item.reasoning:
                    yield event([schema.delta_choice(req, index, item.text, item.logprobs, None, offsets[index],
                                                     tool_calls=item.tool_calls, reasoning=item.reasoning)])
                    offsets[index] += len(item.text)
            else:
                if req.include_usage:
                    usage = schema.usage(ctx["prompt_tokens"], sum(len(r.tokens) for r in results.values()))
                    yield dict(schema.chunk(req, rid, created, model.id, model.fingerprint, []), usage=usage)
            state["status"] = status
        finally:  # also when the client went away: Starlette cancels this generator; nothing here may await
            finish()

    def _remaining(self) -> float | None:
        """Seconds a stream may still run: None until a shutdown signal, then what is left of the grace."""
        if self.drain_deadline is None:
            return None
        return max(self.drain_deadline - time.monotonic(), 0.0)


async def _completion_extras(model: ServedModel, req: GenerationRequest) -> GenerationRequest:
    """What a request needs from its model: logit_bias ids in its vocabulary, suffix's FIM prompts."""
    schema.check_vocab(req, (model.info.get("config") or {}).get("vocab_size"), model.id)
    if req.suffix is None:
        return req
    prompts = await fim.fim_prompts(model, req.prompts or [], req.suffix)
    return dataclasses.replace(req, prompts=prompts, shown_prompts=req.prompts)


_api_error = http_errors.api_error  # the status a client can act on, for corejax's exceptions
api_error = _api_error  # public for the other APIs' modules


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
