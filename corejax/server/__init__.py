"""`corejax serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) over one sandboxed Session per model.

    corejax serve -m smollm2-135m-instruct --port 8000
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")

Endpoints: GET /v1/models, POST /v1/completions, /v1/chat/completions, /v1/embeddings; GET /health and
/metrics (Prometheus). app.py holds the application, schema.py OpenAI's request and response JSON.

The same port speaks other APIs, each a translation into and out of the chat path (so limits, metrics and
structured output are the same), with errors in its own shape:
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
          log_level: str = "info", idle_exit_s: float | None = None) -> None:
    """Starts one Session per model (loading each, with progress bars), then serves until SIGINT/SIGTERM.

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
    served: list[ServedModel] = []
    try:
        for name in models or [None]:
            session = Session(name, warmup=True, keep_alive=0, **(session_options or {}))  # the server keeps them
            model_id = name if name is not None and "/" not in name and not name.endswith(".gguf") \
                else session.source.name
            if any(m.id == model_id for m in served):
                session.close()
                raise SystemExit(f"corejax serve: the model {model_id!r} is named twice")
            served.append(ServedModel(model_id, session))
        server = Server(served, limits)
        config = uvicorn.Config(server.app, host=host, port=port, uds=uds, log_level=log_level, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=int(limits.shutdown_grace_s) + 5)
        where = f"unix:{uds}" if uds else f"http://{host}:{port}/v1"
        print(f"corejax serve: {where} serving {', '.join(m.id for m in served)}", file=sys.stderr, flush=True)
        _Uvicorn(config, server, idle_exit_s).run()
    finally:
        for m in served:
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
