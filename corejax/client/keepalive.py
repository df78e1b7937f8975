"""Keep-alive, a Session's side (Ollama's keep_alive): the model stays loaded in a background process, the kept
server (corejax/daemon.py), for a while after its last request, so the next Session on the same model and options
— in another `corejax generate`, another Python script — starts in a fraction of a second: the process imports no
JAX, loads nothing and compiles nothing.

A kept server is keyed by everything that decides what its model computes and how it is guarded: the model file's
identity, the Session's options (weights, KV cache, speculative default, output filter, sandbox, memory limit,
timeout), the environment the kernels and XLA read, and the corejax installation. It listens on a Unix socket in
a folder only this user may open and speaks the worker protocol (corejax/wire/protocol.py): a Session's request
frames and the sandboxed worker's replies cross it unchanged, so results, errors and timings are those of a worker
of the Session's own. It leaves after `keep_alive` seconds with no Session connected.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corejax.errors import InvalidParameterError, SandboxError, WorkerCrashed
from corejax.paths import PACKAGE_DIR, cache_dir, python_command
from corejax.client.workers import WorkerClient
from corejax.wire.messages import Ended, Terminal, clean
from corejax.client.programs import source_identity
from corejax.wire.protocol import Connection, Kind, ProtocolError
from corejax.version import __version__

KEEP_ALIVE_ENV = "COREJAX_KEEP_ALIVE"
DEFAULT_KEEP_ALIVE_S = 300.0
_CONNECT_TIMEOUT_S = 60.0  # from starting the server process to its socket answering (imports, no JAX)
_MAX_UNIX_PATH = 100  # sockaddr_un holds 108 bytes; a longer cache path runs the worker of the Session's own
# What the kept server's worker inherits from this environment that changes what it computes or how fast.
_ENV_KEYS = ("COREJAX_ISA", "COREJAX_NATIVE", "XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "COREJAX_SECCOMP_LOG")


def _code_stamp() -> str:
    """The corejax code's modification times: an upgraded or edited installation starts a new kept server rather
    than talking to one that runs the old code (a stat per module, about a millisecond)."""
    folders = [PACKAGE_DIR] + [k for k in [PACKAGE_DIR.parent / "kernels"] if not (PACKAGE_DIR / "kernels").is_dir()]
    stamps = [f"{p}:{p.stat().st_mtime_ns}" for folder in folders for p in sorted(folder.rglob("*.py"))]
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()


def parse_duration(value: str | float | None) -> float:
    """Seconds from 300, "300", "300s", "5m", "1h" (None: $COREJAX_KEEP_ALIVE, else 5 minutes)."""
    if value is None:
        value = os.environ.get(KEEP_ALIVE_ENV, DEFAULT_KEEP_ALIVE_S)
    if isinstance(value, bool):
        raise InvalidParameterError(f"keep-alive must be seconds or a duration like 30s, 5m, 1h; got {value!r}")
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


class KeptServer:
    """The kept server for one model and one set of Session options: where its socket and log are, and how to
    reach it (starting it when none answers)."""

    def __init__(self, source: Any, settings: dict[str, Any]):
        self.source, self.settings = source, settings
        env = {name: os.environ.get(name, "") for name in _ENV_KEYS}
        # The interpreter by what it is (`python` and `python3` of one venv are the same) and which environment.
        build = [__version__, str(PACKAGE_DIR), os.path.realpath(sys.executable), sys.prefix, _code_stamp()]
        key = json.dumps([source_identity(source), settings, env, build], sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        self.folder = cache_dir() / "run"
        self.socket = self.folder / f"{digest}.sock"
        self.log = self.folder / f"{digest}.log"

    @property
    def usable(self) -> bool:
        return len(str(self.socket)) <= _MAX_UNIX_PATH

    def _dial(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket))
        except OSError:
            sock.close()
            return None
        return sock

    def connect(self, keep_alive_s: float, *, progress: bool, warmup: bool | str, start_timeout: float) -> KeptClient:
        """A client of the running server, or of one started now (one starter at a time: a lock file)."""
        for _ in range(3):
            sock = self._dial() or self._start(keep_alive_s, progress=progress, warmup=warmup)
            try:
                return KeptClient(self, sock, progress=progress, start_timeout=start_timeout)
            except _ServerLeft:
                continue  # it was leaving (idle) as this process connected: the next one is new
        raise SandboxError(f"the background process that keeps {self.source.name} loaded closed every connection; "
                           f"its log ({self.log}) ends:\n{self.log_tail(2000)}")

    def _start(self, keep_alive_s: float, *, progress: bool, warmup: bool | str) -> socket.socket:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)  # only this user may connect to the sockets in it
        with open(self.folder / f"{self.socket.stem}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            sock = self._dial()
            if sock is not None:
                return sock  # another process started it while this one waited for the lock
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()  # a server that died left it behind
            if progress:
                print(f"corejax: loading {self.source.name} in a background process, kept {keep_alive_s:g} s after "
                      "its last Session (keep_alive=0 or --keep-alive 0: load it in this process instead)",
                      file=sys.stderr, flush=True)
            launch = {"source": [self.source.name, self.source.format, str(self.source.path)],
                      "settings": self.settings, "warmup": warmup}
            cmd = python_command("corejax.daemon", "--socket", str(self.socket), "--idle-exit", f"{keep_alive_s:g}",
                                 "--launch", json.dumps(launch))
            with open(self.log, "wb") as log:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # not stopped with this terminal's process group
            deadline = time.monotonic() + _CONNECT_TIMEOUT_S
            while (sock := self._dial()) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SandboxError(f"the background process that keeps {self.source.name} loaded did not start; "
                                       f"its log ({self.log}) ends:\n{self.log_tail(2000)}\nPass keep_alive=0 (or "
                                       "--keep-alive 0) to load the model in this process instead.")
                time.sleep(0.02)
            return sock

    def log_tail(self, n: int = 600) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(f.tell() - n, 0))
                return clean(f.read(n).decode("utf-8", "replace").strip(), n)
        except OSError:
            return ""


class _ServerLeft(Exception):
    pass


class KeptClient(WorkerClient):
    """A Session's worker connection that reaches the kept server's worker: the same frames, start-up included
    (progress, the sandbox report, ready), plus ENDED for a request the worker never finished there."""

    def __init__(self, server: KeptServer, sock: socket.socket, *, progress: bool, start_timeout: float):
        quiet: Callable[[dict], None] = lambda payload: None  # noqa: E731
        self._init_state(server.source, {}, {}, None if progress else quiet)
        self.sandbox, self.memory_limit, self.timeout = True, None, None
        self.server = server
        self.conn = Connection(sock)
        sock.settimeout(start_timeout)
        try:
            first = self.conn.recv()  # a server leaving when this process connected closes before any frame
        except TimeoutError:
            self.conn.close()
            raise WorkerCrashed(f"the background process that keeps {server.source.name} loaded did not answer "
                                f"within {start_timeout:g} s; its log ({server.log}) ends: {self.log_tail()}") from None
        except (OSError, ProtocolError):
            first = None
        if first is None:
            self.conn.close()
            raise _ServerLeft
        sock.settimeout(None)
        self._route(first)
        self._begin(start_timeout, monitor=False)  # the kept server enforces the timeout and the memory limit

    def _ready(self, payload: dict) -> None:
        pid = payload.get("pid")
        self.pid = pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None

    def _route(self, frame: Any) -> None:
        if frame.rid != 0 and frame.kind == Kind.ENDED:
            try:
                ended = Ended(frame.payload.get("ended"))
            except ValueError:
                raise ProtocolError(f"an ENDED frame with an unknown reason {frame.payload.get('ended')!r}") from None
            with self._lock:
                req = self._pending.pop(frame.rid, None)
            if req is not None:
                req.events.put(Terminal(ended, clean(frame.payload.get("message", ""))))
            return
        if frame.kind == Kind.CHUNK:
            with self._lock:
                req = self._pending.get(frame.rid)
                if req is not None and req.started_at is None:
                    req.started_at = time.monotonic()  # streamed: never re-sent if the server goes away
        super()._route(frame)

    def kill(self, reason: str) -> None:
        if self._kill_reason is None:
            self._kill_reason = reason
        with contextlib.suppress(OSError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)  # only this connection: the server and its worker stay

    def _describe_death(self, reason: str) -> str:
        if self._kill_reason is not None:
            return ("the connection to the background process that keeps the model was closed because "
                    f"{self._kill_reason}")
        tail = self.server.log_tail()
        return (f"the background process that keeps the model ({self.server.socket}) went away: {reason}"
                + (f". Its log ends: {tail}" if tail else ""))

    def log_tail(self, n: int = 600) -> str:
        return self.server.log_tail(n)


def running() -> list[dict[str, Any]]:
    """The kept servers of this cache: pid, model, path, keep-alive and socket (read from their pid files and
    command lines: connecting would count as a Session and postpone their leaving)."""
    folder = cache_dir() / "run"
    found = []
    for pid_file in sorted(folder.glob("*.pid")) if folder.is_dir() else []:
        sock = pid_file.with_suffix(".sock")
        try:
            pid = int(pid_file.read_text())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"--socket\0{sock}\0".encode() in argv and sock.exists():
            found.append({"pid": pid, "socket": str(sock), **_launch_of(pid)})
    return found


def _launch_of(pid: int) -> dict[str, Any]:
    """The model and keep-alive a kept server was started with, from its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        launch = json.loads(argv[argv.index("--launch") + 1])
        return {"model": str(launch["source"][0]), "path": str(launch["source"][2]),
                "idle_exit_s": float(argv[argv.index("--idle-exit") + 1])}
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        return {"model": "?", "path": "?", "idle_exit_s": None}


def stop(models: list[str] | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Stops the kept servers (of these model names or paths; all if None) and waits until they are gone."""
    chosen = [s for s in running() if not models or s["model"] in models or s["path"] in models]
    for s in chosen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(s["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(Path(s["socket"]).exists() for s in chosen) and time.monotonic() < deadline:
        time.sleep(0.05)
    return chosen
