"""`corejax serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) over one sandboxed Session per loaded model.

    corejax serve -m smollm2-135m-instruct --port 8000
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")

Endpoints: GET /v1/models, POST /v1/completions, /v1/chat/completions, /v1/embeddings; GET /health and
/metrics (Prometheus). app.py holds the application, schema.py OpenAI's request and response JSON, streams.py a
request's generation streams, models.py the pool of models (loaded on demand from an allow-list, at most
--max-models, unloaded after keep_alive), fim.py fill-in-the-middle prompts; tool calls are corejax/tools/'s.

The same port speaks other APIs, each a translation into and out of the chat path (so limits, metrics and
structured output and tool calls are the same), with errors in its own shape:
  ollama.py, ollama_models.py  Ollama: POST /api/generate, /api/chat, /api/embed, /api/embeddings, /api/show,
                               /api/pull; GET /api/tags, /api/ps, /api/version
  anthropic.py                 Anthropic: POST /v1/messages, /v1/messages/count_tokens
  responses.py                 OpenAI's Responses API, stateless: POST /v1/responses
  extras.py                    llama.cpp's POST /tokenize, /detokenize; POST /v1/rerank (/rerank, /v2/rerank)
--api-key guards every endpoint but /health, as 'Authorization: Bearer <key>' or 'x-api-key: <key>'
(Anthropic's clients send it so; Ollama has no keys of its own, and its clients take the header)."""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from corejax.server.app import ServedModel, Server, ServerLimits
from corejax.server.models import (
    DEFAULT_KEEP_ALIVE_S,
    ModelPool,
    allowed_models,
    parse_keep_alive,
)

__all__ = ["ServedModel", "Server", "ServerLimits", "serve"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(models: Sequence[str | None], *, host: str = "127.0.0.1", port: int = 8000, uds: str | None = None,
          limits: ServerLimits | None = None, session_options: dict[str, Any] | None = None,
          log_level: str = "info", idle_exit_s: float | None = None, allow: Sequence[str] = (),
          allow_registry: bool = False, max_models: int | None = None,
          keep_alive: str | float | None = None) -> None:
    """Starts one Session per model (loading each, with progress bars), then serves until SIGINT/SIGTERM.

    allow / allow_registry: further models requests may name, loaded on first use, each in its own worker
    (corejax/server/models.py: the allow-list, max_models, keep_alive); models: preloaded, and allowed too.

    At a signal the server stops accepting connections, lets running requests finish for the shutdown grace,
    ends the streams still running with a final error event, and closes the workers. uds: a Unix socket path
    to listen on instead of host:port. idle_exit_s: leave (as at a signal) after that long without a request
    (the keep-alive server of corejax/daemon.py)."""
    import uvicorn

    from corejax.client.session import Session

    limits = limits or ServerLimits()
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if uds is None and not _is_loopback(host) and limits.api_key is None:
        logging.getLogger("corejax.server").warning(
            "serving on %s without --api-key: anyone who can reach this address can use the models", host)
    models = list(models) if models or allow or allow_registry else [None]  # only allow-listed: none preloaded
    allowed = allowed_models(models, allow, allow_registry)  # ids -> what Session() opens; paths resolved now
    ids = {str(v): k for k, v in allowed.items()}
    served: list[ServedModel] = []
    server: Server | None = None
    # Every batch and chunk bucket compiled at start, so streams joining and leaving never wait for a compiler.
    warmups = {"warmup": "batches", **(session_options or {})}

    def load(model_id: str, what: Any) -> ServedModel:
        options = dict(warmups, progress=False)  # a load on demand draws no bars in the log
        return ServedModel(model_id, Session(what, keep_alive=0, **options))

    try:
        for name in models:
            session = Session(name, keep_alive=0, **warmups)  # the server keeps them
            model_id = name if name is not None and name in allowed else ids.get(str(session.source), None) \
                or session.source.name
            if any(m.id == model_id for m in served):
                session.close()
                raise SystemExit(f"corejax serve: the model {model_id!r} is named twice")
            served.append(ServedModel(model_id, session))
        if max_models is not None and len(served) > max_models:
            raise SystemExit(f"corejax serve: {len(served)} models preloaded with -m, more than --max-models "
                             f"{max_models}")
        pool = ModelPool(allowed, load, max_models=max_models,
                         keep_alive_s=DEFAULT_KEEP_ALIVE_S if keep_alive is None else
                         parse_keep_alive(keep_alive, "--keep-alive"))
        pool.allow_registry = allow_registry
        server = Server(served, limits, pool)
        config = uvicorn.Config(server.app, host=host, port=port, uds=uds, log_level=log_level, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=int(limits.shutdown_grace_s) + 5)
        where = f"unix:{uds}" if uds else f"http://{host}:{port}/v1"
        more = [m for m in allowed if m not in server.models]
        print(f"corejax serve: {where} serving {', '.join(m.id for m in served) or 'no model yet'}"
              + (f"; may load {', '.join(more)} (at most {max_models or 'any number of'} at a time)" if more else ""),
              file=sys.stderr, flush=True)
        _Uvicorn(config, server, idle_exit_s).run()
    finally:
        for m in served:
            m.session.close()  # closing twice is a no-op (Session.close)
        if server is not None:
            for m in list(server.models.values()):
                m.session.close()


class _Uvicorn:
    """uvicorn's server with corejax's signal handling: the first SIGINT/SIGTERM drains (Server.begin_drain:
    streams get the shutdown grace, then a final event), a second SIGINT exits at once. Unlike uvicorn's own
    handler it does not raise the signal again after the shutdown, so the workers are closed and the process
    exits with status 0."""

    def __init__(self, config: Any, server: Server, idle_exit_s: float | None = None):
        import uvicorn

        self.server = server
        self.idle_exit_s = idle_exit_s
        self.uvicorn = uvicorn.Server(config)
        self.uvicorn.handle_exit = self._handle_exit  # the instance attribute capture_signals installs

    def _handle_exit(self, sig: int, frame: Any) -> None:
        self.server.begin_drain()
        if self.uvicorn.should_exit and sig == signal.SIGINT:
            self.uvicorn.force_exit = True
        else:
            self.uvicorn.should_exit = True

    def _watch_idle(self) -> None:
        while not self.uvicorn.should_exit:
            time.sleep(0.5)
            if self.server.idle_for() > self.idle_exit_s:
                logging.getLogger("corejax.server").info("idle for %.0f s: leaving", self.idle_exit_s)
                self.uvicorn.should_exit = True  # uvicorn's main loop reads the flag every 0.1 s

    def run(self) -> None:
        if self.idle_exit_s is not None:
            threading.Thread(target=self._watch_idle, name="corejax-idle-exit", daemon=True).start()
        self.uvicorn.run()
