"""The kept server: a background process that holds one Session and lends its sandboxed worker to the Sessions of
other processes over a Unix socket, so a new `corejax generate` or Python script finds the model loaded (Ollama's
keep_alive; corejax/client/keepalive.py starts it and is the other side).

`python -m corejax.daemon --socket PATH --idle-exit SECONDS --launch JSON` binds its socket before it opens the
model, so the process that started it shows the model's loading progress. Each connection then gets what a worker
sends at start-up (its sandbox report, ready); every request frame it sends goes to the Session's worker, and every
reply frame comes back under the connection's own request id. A request the worker never finished comes back as
ENDED (retry, timeout, crashed, cancelled), and the client's Session decides as it would for a worker of its own.
The process leaves after SECONDS with no connection and no request, on SIGTERM or SIGINT, or when the model fails to
load (after telling the connected clients why, as a worker would).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from corejax.types.filter import Blocklist
from corejax.hub import ModelSource
from corejax.wire.messages import Terminal, error_to_wire
from corejax.wire.protocol import Connection, Kind, ProtocolError
from corejax.client.session import Session

# What a connection may ask of the worker; PROBE (tests only) and DESCRIBE never cross a kept server.
_RELAYED = frozenset({Kind.GENERATE, Kind.TOKENIZE, Kind.DETOKENIZE, Kind.INFO, Kind.PING, Kind.EMBED,
                      Kind.CLASSIFY})


class KeptServerProcess:
    """The listening socket, the connections, and when to leave."""

    def __init__(self, path: str, idle_s: float):
        self.path, self.idle_s = Path(path), idle_s
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is this user's only, as its folder is
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old)
        self.listener.listen(64)
        self.pid_file = self.path.with_suffix(".pid")  # `corejax ps` reads it (a connection would reset idle_s)
        self.pid_file.write_text(str(os.getpid()))
        self.listener.settimeout(0.25)  # accept wakes to see whether the process is leaving
        self.lock = threading.Lock()
        self.links: set[_Link] = set()
        self.busy = 0  # requests in flight
        self.last_active = time.monotonic()
        self.progress: dict[str, dict] = {}  # the latest PROGRESS of each start-up stage, for late connections
        self.session: Session | None = None
        self.failure: dict | None = None  # the ERROR payload of a model that failed to load
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.leaving = False

    def on_progress(self, payload: dict) -> None:
        with self.lock:
            self.progress[str(payload.get("stage"))] = payload
            links = list(self.links)
        for link in links:
            link.send(Kind.PROGRESS, 0, payload)

    def accept(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            with self.lock:
                if self.leaving:
                    sock.close()  # the client sees the end before any frame and starts a new server
                    continue
                link = _Link(self, sock)
                self.links.add(link)
                self.last_active = time.monotonic()
                progress = [] if self.ready.is_set() else list(self.progress.values())
            threading.Thread(target=link.run, args=(progress,), name="corejax-kept-link", daemon=True).start()

    def wait_until_idle(self) -> None:
        """Returns when nothing has been connected or running for idle_s seconds (or on a signal); from then
        on no connection is taken."""
        while not self.stop.wait(0.25):
            with self.lock:
                if not self.links and not self.busy and time.monotonic() - self.last_active > self.idle_s:
                    self.leaving = True
                    break
        with self.lock:
            self.leaving = True
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a new Session starts a new server from now on
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()
        self.listener.close()

    def drop(self, link: _Link) -> None:
        with self.lock:
            self.links.discard(link)
            self.last_active = time.monotonic()

    def request_started(self) -> None:
        with self.lock:
            self.busy += 1

    def request_ended(self) -> None:
        with self.lock:
            self.busy -= 1
            self.last_active = time.monotonic()


class _Link:
    """One connected Session."""

    def __init__(self, server: KeptServerProcess, sock: socket.socket):
        self.server = server
        self.conn = Connection(sock)
        self.requests: dict[int, Any] = {}  # the client's request id -> Session.open_request's handle
        self.lock = threading.Lock()

    def send(self, kind: Kind, rid: int, payload: dict | None = None) -> bool:
        try:
            self.conn.send(kind, rid, payload)
            return True
        except (OSError, ProtocolError):
            return False

    def run(self, progress: list[dict]) -> None:
        try:
            for payload in progress:
                self.send(Kind.PROGRESS, 0, payload)
            self.server.ready.wait()
            if self.server.failure is not None:
                self.send(Kind.ERROR, 0, self.server.failure)
                return
            session = self.server.session
            assert session is not None
            report = session.sandbox_report()
            self.send(Kind.READY, 0, {"stage": "policy", "report": report["layers"]})
            self.send(Kind.READY, 0, {"stage": "loaded", "pid": report["pid"]})
            while (frame := self.conn.recv()) is not None:
                if frame.kind == Kind.SHUTDOWN:
                    break
                if frame.kind == Kind.CANCEL:
                    with self.lock:
                        handle = self.requests.get(frame.rid)
                    if handle is not None:
                        handle.cancel()
                    continue
                if frame.kind not in _RELAYED or frame.rid == 0:
                    break  # not a request a Session sends: this connection is broken
                self.server.request_started()
                try:
                    handle = session.open_request(frame.kind, frame.payload)
                except BaseException:
                    self.server.request_ended()
                    raise
                with self.lock:
                    self.requests[frame.rid] = handle
                threading.Thread(target=self._relay, args=(frame.rid, handle), name="corejax-kept-request",
                                 daemon=True).start()
        except (OSError, ProtocolError):
            pass  # the client went away or broke the protocol: its requests stop below
        finally:
            with self.lock:
                handles = list(self.requests.values())
            for handle in handles:
                handle.cancel()
            self.conn.close()
            self.server.drop(self)

    def _relay(self, rid: int, handle: Any) -> None:
        try:
            for event in handle:
                if isinstance(event, Terminal):
                    self.send(Kind.ENDED, rid, {"ended": event.ended.value, "message": event.message})
                elif not self.send(event.kind, rid, event.payload):
                    handle.cancel()  # the client is gone: stop the request in the worker
                    return
        finally:
            handle.close()
            with self.lock:
                self.requests.pop(rid, None)
            self.server.request_ended()


def session_options(settings: dict[str, Any]) -> dict[str, Any]:
    """Session keywords from keepalive's settings (plain data: the output filter as its patterns)."""
    options = dict(settings)
    patterns = options.pop("output_filter", None)
    options["output_filter"] = None if patterns is None else Blocklist(patterns)
    return options


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corejax.daemon")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--idle-exit", type=float, required=True, help="seconds with no connection before leaving")
    ap.add_argument("--launch", required=True, help="JSON: source [name, format, path], settings, warmup")
    args = ap.parse_args(argv)
    launch = json.loads(args.launch)
    server = KeptServerProcess(args.socket, args.idle_exit)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop.set())
    threading.Thread(target=server.accept, name="corejax-kept-accept", daemon=True).start()
    name, fmt, path = launch["source"]
    try:
        server.session = Session(ModelSource(name, fmt, Path(path)), keep_alive=0, progress=True,
                                 warmup=launch.get("warmup") or False, _on_progress=server.on_progress,
                                 **session_options(launch["settings"]))
    except Exception as e:  # noqa: BLE001 - told to every waiting client, as a worker's failed start is
        server.failure = error_to_wire(e)
        server.ready.set()
        print(f"corejax: the model did not load: {e}", flush=True)
        server.stop.set()
        server.wait_until_idle()
        deadline = time.monotonic() + 5.0
        while server.links and time.monotonic() < deadline:  # the connected clients read the error first
            time.sleep(0.02)
        return 1
    server.ready.set()
    print(f"corejax: serving {name} on {args.socket}, leaving {args.idle_exit:g} s after the last Session",
          flush=True)
    server.wait_until_idle()
    server.session.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
