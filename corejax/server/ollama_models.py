"""Ollama's model endpoints on `corejax serve`: /api/tags, /api/show, /api/ps, /api/pull, /api/version.

/api/tags and /api/ps list the models this server answers for (all loaded for the server's whole life, so both
lists are the same); /api/pull fetches a registry model (corejax/hub/) into the local cache, for a later
`corejax serve -m NAME`, streaming Ollama's progress lines."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from corejax import errors, hub
from corejax.server.schema import ApiError, bad
from corejax.version import __version__

NDJSON = "application/x-ndjson"

# `server` is corejax.server.app's Server (not imported here: app imports this module to build its routes).

_POLL_S = 0.5  # how often a streamed pull reports the bytes downloaded so far


def routes(server: Any, route: Callable[..., Route]) -> list[Route]:
    api = _Models(server)
    return [route("/api/tags", "tags", api.tags, "GET"), route("/api/show", "show", api.show),
            route("/api/ps", "ps", api.ps, "GET"), route("/api/pull", "pull", api.pull),
            route("/api/version", "version", api.version, "GET")]


def _digest(m: Any) -> str:
    entry = hub.REGISTRY.get(m.id)
    if entry is not None and entry.sha256:
        return entry.sha256
    return hashlib.sha256(m.fingerprint.encode()).hexdigest()


def _details(info: dict) -> dict:
    arch = info.get("architecture") or ""
    return {"parent_model": "", "format": info.get("format") or "", "family": arch, "families": [arch] if arch
            else None, "parameter_size": "", "quantization_level": str(info.get("weights") or "").upper()}


class _Models:
    def __init__(self, server: Any):
        self.server = server

    async def _info(self, m: Any) -> dict:
        try:
            return await asyncio.to_thread(m.session.info)
        except errors.CorejaxError:  # a worker restarting: what a card needs is not worth a failure
            return {}

    async def _card(self, m: Any) -> dict:
        info = await self._info(m)
        return {"name": m.id, "model": m.id, "modified_at": _iso(m.created),
                "size": int(info.get("weight_bytes") or 0), "digest": _digest(m), "details": _details(info)}

    async def tags(self, request: Request, ctx: dict) -> Response:
        """Every model this server may answer for: the loaded ones with their details, the others (which a
        request loads) by name."""
        out = []
        for entry in self.server.pool.listing():
            m = self.server.models.get(entry["id"])
            out.append(await self._card(m) if m is not None else
                       {"name": entry["id"], "model": entry["id"], "modified_at": _iso(self.server.started),
                        "size": 0, "digest": "", "details": {}})
        return JSONResponse({"models": out})

    async def ps(self, request: Request, ctx: dict) -> Response:
        """The loaded models (the pool's ps): what each reserved, and when it unloads."""
        out = []
        for entry in self.server.pool.ps():
            m = self.server.models.get(entry["id"])
            if m is None:  # unloaded meanwhile
                continue
            card = await self._card(m)
            card.pop("modified_at")
            context = (await self._info(m)).get("config", {}).get("max_context")
            # No expiry (a preloaded model, keep_alive -1, or a request running): far in the future, as Ollama.
            expires = entry["expires_at"]
            out.append(dict(card, size=entry["size_bytes"] or card["size"], size_vram=0, context_length=context,
                            expires_at=_iso(expires) if expires is not None else "2318-08-24T00:00:00Z"))
        return JSONResponse({"models": out})

    async def show(self, request: Request, ctx: dict) -> Response:
        body = await self.server.read_body(request)
        name = body.get("model", body.get("name"))
        if not isinstance(name, str) or not name:
            raise bad("model is required (GET /api/tags lists the models of this server)", "model")
        m = await self.server.served_model(name.removesuffix(":latest"), ctx, body.get("keep_alive"))
        with self.server.admitted(m):
            return await self._show(m)

    async def _show(self, m: Any) -> Response:
        info = await self._info(m)
        cfg, arch = info.get("config") or {}, info.get("architecture") or "model"
        model_info = {"general.architecture": arch, "general.name": info.get("name") or m.id}
        for ours, theirs in (("max_context", "context_length"), ("hidden_size", "embedding_length"),
                             ("num_layers", "block_count"), ("num_heads", "attention.head_count"),
                             ("num_kv_heads", "attention.head_count_kv"), ("vocab_size", "vocab_size")):
            if cfg.get(ours) is not None:
                model_info[f"{arch}.{theirs}"] = cfg[ours]
        card = await self._card(m)
        return JSONResponse({"modelfile": f"# served by corejax {__version__}\nFROM {info.get('path', m.id)}\n",
                             "parameters": "", "template": "", "details": card["details"], "model_info": model_info,
                             "capabilities": ["completion"] if m.generates else ["embedding"],
                             "modified_at": card["modified_at"]})

    async def version(self, request: Request, ctx: dict) -> Response:
        return JSONResponse({"version": __version__})  # corejax's own version, not an Ollama release

    async def pull(self, request: Request, ctx: dict) -> Response:
        body = await self.server.read_body(request)
        name = body.get("model", body.get("name"))
        if not isinstance(name, str) or not name:
            raise bad("model is required: a name of corejax's registry (`corejax list`)", "model")
        name = name.removesuffix(":latest")
        entry = hub.REGISTRY.get(name)
        if entry is None:
            raise ApiError(404, f"pull model manifest: {name!r} is not in corejax's registry; known: "
                                f"{', '.join(sorted(hub.REGISTRY))}", code="model_not_found")
        ctx["model"] = name
        stream = body.get("stream", True)
        lines = self._progress(entry)
        if stream is not False:
            return StreamingResponse(self._ndjson(request, ctx, lines), media_type=NDJSON)
        last: dict = {}
        async with contextlib.aclosing(lines):
            async for last in lines:
                if "error" in last:
                    raise ApiError(500, last["error"], type="server_error")
        return JSONResponse(last)

    async def _progress(self, entry: hub.ModelEntry) -> AsyncIterator[dict]:
        """Ollama's pull lines: the manifest, one layer (the model's file or folder) with its bytes so far,
        the digest check, success; an {"error": ...} line when the pull fails."""
        digest = f"sha256:{entry.sha256 or hashlib.sha256(entry.name.encode()).hexdigest()}"
        layer = {"status": f"pulling {digest[7:19]}", "digest": digest, "total": entry.size}
        yield {"status": "pulling manifest"}
        if not hub.is_cached(entry.name):
            task = asyncio.create_task(asyncio.to_thread(hub.pull, entry.name, progress=False))
            while not task.done():
                yield dict(layer, completed=min(_bytes_under(hub.cache_dir() / "models" / entry.name), entry.size))
                await asyncio.wait({task}, timeout=_POLL_S)
            try:
                task.result()
            except errors.CorejaxError as e:
                yield {"error": str(e)}
                return
        yield dict(layer, completed=entry.size)
        if self.server.pool.allow_registry:  # now cached: requests may name it (without the flag: only as listed)
            self.server.pool.allowed.setdefault(entry.name, entry.name)
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        yield {"status": "success"}


    async def _ndjson(self, request: Request, ctx: dict, lines: AsyncIterator[dict]) -> AsyncIterator[bytes]:
        status = 499  # until the last line went out: the client left
        try:
            async with contextlib.aclosing(lines):
                async for line in lines:
                    yield json.dumps(line).encode() + b"\n"
                    status = 500 if "error" in line else 200
        finally:
            self.server.log_request(request, ctx, status)


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _bytes_under(path: Any) -> int:
    try:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0
