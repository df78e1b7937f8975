"""llama.cpp's /tokenize and /detokenize, and reranking (/v1/rerank, with the /rerank and /v2/rerank aliases
of llama.cpp's server and Cohere's API) on `corejax serve`'s port. Errors in OpenAI's shape, as llama.cpp's."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from corejax import errors
from corejax.server.http_errors import api_error
from corejax.server.schema import ApiError, bad

# `server` is corejax.server.app's Server (not imported here: app imports this module to build its routes).

MAX_DOCUMENTS = 1024  # one rerank request's documents (each is one embedding)


def routes(server: Any) -> list[Route]:
    api = _Extras(server)
    return [Route("/tokenize", server.route("tokenize", api.tokenize), methods=["POST"]),
            Route("/detokenize", server.route("detokenize", api.detokenize), methods=["POST"]),
            *(Route(path, server.route("rerank", api.rerank), methods=["POST"])
              for path in ("/v1/rerank", "/rerank", "/v2/rerank"))]


class _Extras:
    def __init__(self, server: Any):
        self.server = server

    async def tokenize(self, request: Request, ctx: dict) -> Response:
        """{"content": text, "add_special"?: bool, "with_pieces"?: bool, "model"?} -> {"tokens": [...]} (with
        pieces: [{"id", "piece"}])."""
        body = await self.server.read_body(request)
        text, add_special = body.get("content"), body.get("add_special", False)
        if not isinstance(text, str):
            raise bad("content must be a string", "content")
        if not isinstance(add_special, bool) or not isinstance(body.get("with_pieces", False), bool):
            raise bad("add_special and with_pieces must be true or false", "add_special")
        model = await self.server.served_model(body.get("model"), ctx, body.get("keep_alive"))
        with self.server.admitted(model):  # counted in flight: an idle model may be evicted, a busy one not
            return await self._tokenize(model, text, add_special, bool(body.get("with_pieces")))

    @staticmethod
    async def _tokenize(model: Any, text: str, add_special: bool, with_pieces: bool) -> Response:
        try:
            ids = await asyncio.to_thread(model.session.tokenize, text, add_special=add_special)
            if with_pieces:
                pieces = await asyncio.to_thread(lambda: [model.session.detokenize([i]) for i in ids])
                return JSONResponse({"tokens": [{"id": i, "piece": p} for i, p in zip(ids, pieces)]})
        except errors.CorejaxError as e:
            raise _error(e) from None
        return JSONResponse({"tokens": ids})

    async def detokenize(self, request: Request, ctx: dict) -> Response:
        """{"tokens": [ids], "model"?} -> {"content": text}."""
        body = await self.server.read_body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise bad("tokens must be a list of token ids (integers)", "tokens")
        model = await self.server.served_model(body.get("model"), ctx, body.get("keep_alive"))
        with self.server.admitted(model):
            return await self._detokenize(model, ids)

    @staticmethod
    async def _detokenize(model: Any, ids: list[int]) -> Response:
        vocab = (await asyncio.to_thread(model.session.info)).get("config", {}).get("vocab_size")
        if vocab is not None and any(not 0 <= i < vocab for i in ids):
            raise bad(f"tokens must be ids in [0, {vocab}) for {model.id}", "tokens")
        try:
            text = await asyncio.to_thread(model.session.detokenize, ids)
        except errors.CorejaxError as e:
            raise _error(e) from None
        return JSONResponse({"content": text})

    async def rerank(self, request: Request, ctx: dict) -> Response:
        """{model, query, documents, top_n?, return_documents?} -> {results: [{index, relevance_score,
        document?}], usage}, best first. The score is the cosine similarity of the query's and the document's
        sentence embeddings (an embedding model, a bi-encoder: corejax's registry has no cross-encoder, whose
        scores would come from reading query and document together)."""
        body = await self.server.read_body(request)
        query, docs = body.get("query"), body.get("documents")
        if not isinstance(query, str) or not query:
            raise bad("query must be a non-empty string", "query")
        if not isinstance(docs, list) or not docs:
            raise bad("documents must be a non-empty list of strings (or {\"text\": ...} objects)", "documents")
        if len(docs) > MAX_DOCUMENTS:
            raise bad(f"documents holds {len(docs)} documents; the limit is {MAX_DOCUMENTS}", "documents")
        texts = [d.get("text") if isinstance(d, dict) else d for d in docs]
        if not all(isinstance(t, str) for t in texts):
            raise bad("documents must be strings or {\"text\": ...} objects", "documents")
        top_n = body.get("top_n", len(texts))
        if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1:
            raise bad("top_n must be a positive integer", "top_n")
        model = await self.server.served_model(body.get("model") or self._encoder(), ctx, body.get("keep_alive"))
        if model.generates:
            raise bad(f"{model.id} is a generative model; rerank needs an embedding model (such as "
                      "all-minilm-l6-v2)", "model")
        _, vectors, counts = await self.server.embed(model.id, [query, *texts], ctx, body.get("keep_alive"))
        v = np.asarray(vectors, np.float64)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        scores = v[1:] @ v[0]
        order = sorted(range(len(texts)), key=lambda i: -scores[i])[:top_n]
        results = []
        for i in order:
            r: dict = {"index": i, "relevance_score": float(scores[i])}
            if body.get("return_documents"):
                r["document"] = {"text": texts[i]}
            results.append(r)
        total = sum(counts)
        return JSONResponse({"model": model.id, "object": "list", "results": results,
                             "usage": {"prompt_tokens": total, "total_tokens": total}})

    def _encoder(self) -> str | None:
        """The model a rerank without one uses: the server's only embedding model, if it has one."""
        encoders = [m.id for m in self.server.models.values() if not m.generates]
        return encoders[0] if len(encoders) == 1 else None


def _error(e: errors.CorejaxError) -> ApiError:
    return api_error(e)
