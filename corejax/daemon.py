"""Keep-alive for the `corejax` command: a model stays loaded in a background `corejax serve` for a while, so the
next `corejax generate` on it starts in a fraction of a second (Ollama's keep_alive, llama.cpp's server).

The first `corejax generate` of a model (with the same weights, KV type, sandbox and blocklist) starts
`corejax serve --uds SOCKET --idle-exit SECONDS` in its own session and streams its answer from it; later
ones find the socket and skip Python's JAX import, the model load and the compiler: they import no JAX at
all. The server leaves after --keep-alive seconds without a request (default 5 minutes). The socket lives in
a folder only this user can open (0700 under the corejax cache), so no key is needed; the model still runs in
the server's sandboxed worker. `--keep-alive 0` (or COREJAX_KEEP_ALIVE=0) runs in the command's own process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corejax.errors import (
    ContextLengthError,
    CorejaxError,
    InvalidParameterError,
    RequestTimeout,
    SandboxError,
    WorkerCrashed,
)
from corejax.paths import cache_dir
from corejax.version import __version__

KEEP_ALIVE_ENV = "COREJAX_KEEP_ALIVE"
DEFAULT_KEEP_ALIVE_S = 300.0
START_TIMEOUT_S = 600.0
_MAX_UNIX_PATH = 100  # sockaddr_un holds 108 bytes; a longer cache path falls back to the in-process run


def parse_duration(value: str | float | None) -> float:
    """Seconds from "300", "300s", "5m", "1h" (None: $COREJAX_KEEP_ALIVE, else 5 minutes)."""
    if value is None:
        value = os.environ.get(KEEP_ALIVE_ENV, DEFAULT_KEEP_ALIVE_S)
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        unit = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
        try:
            seconds = float(text[:-1] if unit else text) * (unit or 1)
        except ValueError:
            raise InvalidParameterError(f"keep-alive must be seconds or a duration like 30s, 5m, 1h; got {value!r}") \
                from None
    if not seconds >= 0:
        raise InvalidParameterError(f"keep-alive must be >= 0 seconds; got {value!r}")
    return seconds


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None = None):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))


class KeptServer:
    """A background `corejax serve` on a Unix socket, keyed by what the model is served with."""

    def __init__(self, name: str, model_path: str, serve_args: list[str], key_parts: list[str]):
        self.name, self.serve_args = name, serve_args
        # Also what the server inherits from this environment and installation: the kernels' ISA, and which
        # corejax it runs (an upgraded package starts a new server rather than talking to an old one).
        env = [os.environ.get(v, "") for v in ("COREJAX_ISA", "COREJAX_NATIVE", "XLA_FLAGS")]
        build = [__version__, str(Path(__file__).resolve().parent), sys.executable]
        key = hashlib.sha256("\0".join([model_path, *key_parts, *env, *build]).encode()).hexdigest()[:16]
        self.folder = cache_dir() / "run"
        self.socket = self.folder / f"{key}.sock"
        self.log = self.folder / f"{key}.log"

    @property
    def usable(self) -> bool:
        return len(str(self.socket)) <= _MAX_UNIX_PATH

    def _request(self, method: str, path: str, body: dict | None = None,
                 timeout: float | None = 5.0) -> http.client.HTTPResponse:
        conn = _UnixConnection(self.socket, timeout)
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        return conn.getresponse()

    def alive(self) -> bool:
        try:
            return self._request("GET", "/health").status == 200
        except OSError:
            return False

    def ensure(self, keep_alive_s: float, note: str) -> None:
        """Connects to the server, or starts it (one starter at a time: a lock file) and waits until it answers."""
        if self.alive():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)  # only this user may connect to the sockets in it
        with open(self.folder / f"{self.socket.stem}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.alive():
                return
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()  # a server that died left it behind
            if note:
                print(note, file=sys.stderr, flush=True)
            cmd = [sys.executable, "-c", "from corejax.cli import main; raise SystemExit(main())", "serve",
                   "--uds", str(self.socket), "--idle-exit", f"{keep_alive_s:g}", "--log-level", "warning",
                   *self.serve_args]
            with open(self.log, "wb") as log:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # not killed with this terminal's process group
            deadline = time.monotonic() + START_TIMEOUT_S
            while not self.alive():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SandboxError(f"the background server did not start; its log ({self.log}) ends:\n"
                                       f"{self._log_tail()}\nRun with --keep-alive 0 to load the model in this "
                                       "process instead.")
                time.sleep(0.1)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stream(self, prompt: str, sampling: dict[str, Any]) -> Iterator[tuple[str, dict | None]]:
        """(text piece, None) as they come, then ("", the final chunk: finish_reason, usage, timings)."""
        body = {"prompt": prompt, "stream": True, **sampling}
        try:
            resp = self._request("POST", "/v1/completions", body, timeout=None)
        except OSError as e:
            raise WorkerCrashed(f"the background server at {self.socket} stopped answering ({e}); run the "
                                "command again to start a new one") from None
        if resp.status != 200:
            raise _error(resp.status, resp.read())
        final: dict | None = None
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[len(b"data: "):])
            if "error" in event:
                raise _error(500, json.dumps(event).encode())
            choice = event["choices"][0]
            if choice.get("text"):
                yield choice["text"], None
            if choice.get("finish_reason"):
                final = {"finish_reason": choice["finish_reason"], "timings": event.get("timings")}
        if final is None:
            raise WorkerCrashed("the background server ended the stream without a result; run the command again")
        yield "", final


def _error(status: int, raw: bytes) -> CorejaxError:
    """The server's OpenAI-shaped error as the corejax exception the in-process run would raise."""
    try:
        error = json.loads(raw)["error"]
        message, code = str(error["message"]), error.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = raw.decode(errors="replace")[:500], None
    if code == "context_length_exceeded":
        return ContextLengthError(message)
    if status == 400:
        return InvalidParameterError(message)
    if code == "timeout":
        return RequestTimeout(message)
    if code in ("worker_crashed", "server_shutdown"):
        return WorkerCrashed(message)
    return CorejaxError(message)
