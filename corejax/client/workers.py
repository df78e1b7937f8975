"""The parent's side of one worker: starts it (a subprocess, or a thread for sandbox=False), routes reply
frames to the requests waiting for them, and turns a death, a hang or a broken frame into per-request errors.

Reading is leader/follower (`wait`): the caller waiting for a reply reads the socket itself, and hands any
frame for another request to that request's mailbox; when it has its own, it passes the reading on to
another waiting caller. A reply so wakes its caller directly, where a reader thread handed it over through a
queue, a second thread wake-up (a few percent of a sentence embedding on a VM; docs/MEASUREMENTS.md). A reader thread
still serves the worker's start-up frames, then stops. A monitor thread enforces the request timeout and the
memory limit by killing the worker, which the reading caller then sees as end-of-file.
"""

from __future__ import annotations

import gc
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corejax import errors
from corejax.client.processes import rss_bytes, spawn
from corejax.client.programs import (
    copy_programs,
    folder_bytes,
    merge_programs,
    program_cache_dir,
)
from corejax.client.worker_command import worker_argv, worker_env
from corejax.sandbox.layer import missing_layers
from corejax.types.weights_file import WorkerStage
from corejax.wire.messages import Ended, Terminal, clean, error_from_wire
from corejax.wire.protocol import Connection, Kind, ProtocolError

WORKER_MODULE = "corejax.worker.main"  # what a sandboxed worker runs (python -m)


# Frames one mailbox may hold unread (a caller normally takes each as it comes; a hostile worker could
# otherwise make the parent hold a flood of them).
_MAX_QUEUED = 10_000

_LEAD = object()  # put in a waiting caller's mailbox: the socket is free, read it (WorkerClient.wait)


# What decoding a frame can raise (msgpack's errors are ValueErrors). Not `Exception`: an exception a signal
# handler raises while this thread reads (a notebook's interrupt, mid-frame possibly) is the caller's, and must
# reach it with the connection intact, not be taken for a bad frame that ends the worker.
_UNREADABLE = (ValueError, TypeError, LookupError, AttributeError, ArithmeticError, RecursionError, MemoryError)

class Mailbox:
    """One request's mailbox: reply frames, then possibly a messages.Terminal event (crashed, timeout, retry)."""

    def __init__(self, rid: int, kind: Kind, payload: dict):
        self.rid, self.kind, self.payload = rid, kind, payload
        self.events: queue.Queue = queue.Queue()
        self.started_at: float | None = None
        self.delivered = False  # a CHUNK reached the caller: the request can no longer be re-sent silently


def describe(source: Any, timeout: float = 120.0) -> dict:
    """A GGUF file's header (`corejax info`) as read by a sandboxed worker that loads nothing else: the parent
    never parses a model file. The answer is the worker's, so callers treat it as untrusted text."""
    client = WorkerClient(source, options={"describe": True}, timeout=timeout, start_timeout=timeout)
    try:
        req = client.submit(Kind.DESCRIBE)
        while True:
            event = client.wait(req)
            if isinstance(event, Terminal):
                raise errors.WorkerCrashed(f"reading the file's header failed: {event.message}")
            if event.kind == Kind.ERROR:
                raise error_from_wire(event.payload, " while reading the file's header")
            if event.kind == Kind.RESULT:
                info = event.payload.get("info")
                if not isinstance(info, dict):
                    raise errors.SandboxError("the worker answered DESCRIBE without an info map")
                return info
    finally:
        client.close()


class WorkerClient:
    def __init__(self, source: Any, *, sandbox: bool = True, memory_limit: int | None = None,
                 timeout: float | None = None, module: str = WORKER_MODULE, pythonpath: tuple[str, ...] = (),
                 start_timeout: float = 600.0, network_namespace: bool = True, options: dict | None = None,
                 require: dict[str, bool] | None = None,
                 on_progress: Callable[[dict], None] | None = None):
        self._init_state(source, options, require, on_progress)
        self.sandbox = sandbox
        self.memory_limit = memory_limit
        self.timeout = timeout
        self.module = module  # the worker's main module: corejax's, or the test suite's probe worker
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn = Connection(parent)
        try:
            if sandbox:
                self._spawn(child, pythonpath, network_namespace)
            else:
                from corejax.worker.main import serve_in_process

                self.runtime = None  # sandbox=False only: the Runtime, for tests that inspect the model

                def loaded(runtime: Any) -> None:
                    self.runtime = runtime

                self._thread = threading.Thread(target=serve_in_process, args=(child, source, loaded, self.options),
                                                name="corejax-in-process-worker", daemon=True)
                self._thread.start()
                child = None
        finally:
            if child is not None:
                child.close()  # the worker holds its own copy; ours would hide the worker's death
        self._begin(start_timeout, monitor=sandbox)

    def _init_state(self, source: Any, options: dict | None, require: dict[str, bool] | None,
                    on_progress: Callable[[dict], None] | None) -> None:
        self.source = source
        self.options = dict(options or {})  # how the worker loads the model (weights, engine config): plain data
        self.require = dict(require or {})
        self._on_progress = on_progress or self._show_progress
        self.pid: int | None = None
        self.report: list[dict] = []
        self.proc: subprocess.Popen | None = None
        self.dead = False
        self._death: str | None = None
        self._kill_reason: str | None = None
        self._timed_out: int | None = None
        self._lock = threading.Lock()
        self._pending: dict[int, Mailbox] = {}
        self._lead_mu = threading.Lock()  # guards _leading and _waiting (WorkerClient.wait)
        self._leading = False  # a caller is reading the socket
        self._waiting: set[Mailbox] = set()  # callers blocked on their mailbox while another reads
        self._next_rid = 1
        self._startup: queue.Queue = queue.Queue()
        self._started = False  # the worker said it is ready: frames for id 0 are dropped from then on
        self._private: Path | None = None

    def _begin(self, start_timeout: float, monitor: bool) -> None:
        """Reads the worker's start-up frames until it is ready (or raises and closes)."""
        threading.Thread(target=self._read_startup, name="corejax-sandbox-startup", daemon=True).start()
        if monitor:
            threading.Thread(target=self._monitor, name="corejax-sandbox-monitor", daemon=True).start()
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.close()
            raise

    # --- starting -----------------------------------------------------------------------------------------

    def _spawn(self, child: socket.socket, pythonpath: tuple[str, ...], network_namespace: bool) -> None:
        self._private = Path(tempfile.mkdtemp(prefix="corejax-worker-"))
        tmp, cwd = self._private / "tmp", self._private / "cwd"
        tmp.mkdir()
        cwd.mkdir()
        # Compiled programs persist across sandboxed workers, one folder per kernel build and per model file
        # (program_cache_dir), which only this process writes: the worker gets a private copy, and what it added
        # by the time it is ready (its warm-up's programs, before any request reached it) is merged back
        # (merge_programs), never over an existing program. So a worker can never write what a worker of another
        # model executes, nor what any unsandboxed Runtime loads, and a request that compromises a worker cannot
        # reach the model's later workers: programs compiled after start-up die with the worker.
        self._programs = program_cache_dir(self.source, self.options.get("native_kernels"))
        self._weights = WorkerStage.open(self.source, self.options.get("native_kernels"))  # the same, for weights
        self.options["weights_cache"] = self._weights.options() if self._weights else None
        xla = self._private / "xla"
        copy_programs(self._programs, xla)
        env = worker_env(tmp, xla, pythonpath)
        cmd = worker_argv(self.module, child.fileno(), tmp, xla, self.source, self.options, env, pythonpath,
                          network_namespace, self._weights.argv() if self._weights else ())
        self._log = open(self._private / "worker.log", "wb")  # noqa: SIM115 - the worker's stderr, closed in close()
        self.proc = spawn(cmd, pass_fds=[child.fileno()], close_fds=True, env=env, cwd=cwd,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log)
        self.pid = self.proc.pid

    def _wait_ready(self, start_timeout: float) -> None:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                frame = self._startup.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                self.kill(f"it did not load the model within {start_timeout:.0f} s")
                frame = self._startup.get()
            if isinstance(frame, str):
                raise errors.WorkerCrashed(f"the sandboxed worker could not start: {frame}")
            if frame.kind == Kind.ERROR:
                self.kill("it failed to start")
                raise error_from_wire(frame.payload, " while loading the model")
            if frame.kind == Kind.PROGRESS:
                self._on_progress(frame.payload)
                continue
            self._close_bars()
            if frame.kind == Kind.READY and frame.payload.get("stage") == "policy":
                self.report = [dict(layer) for layer in frame.payload.get("report") or [] if isinstance(layer, dict)]
                missing = missing_layers(self.report, self.require) if self.sandbox else []
                if missing:
                    self.kill("a layer of its sandbox did not engage")
                    names = ", ".join(clean(layer.get("name"), 40) for layer in missing)
                    raise errors.SandboxError(
                        f"the sandbox could not engage {names} ("
                        + "; ".join(clean(layer.get("detail"), 300) for layer in missing)
                        + "), so the model was not opened. Fix the system, or accept the risk with Session(..., "
                        f"sandbox_require={{{', '.join(repr(str(layer.get('name'))) + ': False' for layer in missing)}}})")
            elif frame.kind == Kind.READY:
                if self.proc is not None and self._private is not None:
                    # Start-up's programs only (the warm-up's), from a worker that has seen nothing but the
                    # model file: a worker compromised by a request never adds a program later workers run.
                    merge_programs(self._private / "xla", self._programs)
                    if self._weights is not None:
                        self._weights.finish()
                self._ready(frame.payload)
                return

    def _ready(self, payload: dict) -> None:
        """The worker's last start-up frame (a kept server's carries its worker's pid)."""

    def _show_progress(self, p: dict) -> None:
        """The worker's startup stages ("loading weights", "compiling") as progress bars here."""
        from tqdm.auto import tqdm

        bars = self.__dict__.setdefault("_bars", {})
        try:
            stage, done, total = clean(p.get("stage", ""), 60), int(p.get("done", 0)), int(p.get("total", 0))
        except (TypeError, ValueError):
            return  # a malformed PROGRESS frame shows nothing
        if stage not in bars:
            unit = "tensor" if stage == "loading weights" else "step"
            bars[stage] = tqdm(total=total or None, desc=stage, unit=unit, leave=False)
        bar = bars[stage]
        bar.update(done - bar.n)

    def _close_bars(self) -> None:
        for bar in self.__dict__.pop("_bars", {}).values():
            bar.close()

    # --- requests -----------------------------------------------------------------------------------------

    def submit(self, kind: Kind, payload: dict | None = None) -> Mailbox:
        with self._lock:
            rid = self._next_rid
            self._next_rid += 1
            req = Mailbox(rid, kind, payload or {})
            if self.dead:
                req.events.put(Terminal(Ended.RETRY, self._death))
                return req
            self._pending[rid] = req
        try:
            self.conn.send(kind, rid, req.payload)
        except OSError as e:
            self._die(f"sending to it failed ({e})")
        return req

    def forget(self, req: Mailbox) -> None:
        """The caller stopped waiting: drop the mailbox and tell the worker to skip or stop the request."""
        with self._lock:
            known = self._pending.pop(req.rid, None) is not None
        if known and not self.dead:
            try:
                self.conn.send(Kind.CANCEL, req.rid)
            except OSError:
                pass

    def wait(self, req: Mailbox) -> Any:
        """req's next event (a frame, or a messages.Terminal), reading the socket while no other caller does."""
        while True:
            with self._lead_mu:
                if not req.events.empty():
                    event = req.events.get_nowait()
                    if event is _LEAD:
                        continue
                    return event
                lead = not self._leading
                if lead:
                    self._leading = True
                else:
                    self._waiting.add(req)
            if not lead:
                try:
                    event = req.events.get()
                except BaseException:  # interrupted (KeyboardInterrupt): pass on a LEAD it may hold
                    self._abandon(req)
                    raise
                with self._lead_mu:
                    self._waiting.discard(req)
                if event is not _LEAD:
                    return event
                continue
            try:
                while req.events.empty() and self._read_one() is not None:
                    pass
            finally:
                with self._lead_mu:
                    self._leading = False
                    self._pass_lead()

    def _pass_lead(self) -> None:
        """Under _lead_mu, no caller reading: wake one still blocked on an empty mailbox to read next."""
        follower = next((r for r in self._waiting if r.events.empty()), None)
        if follower is not None:
            self._waiting.discard(follower)
            follower.events.put(_LEAD)

    def _abandon(self, req: Mailbox) -> None:
        """A waiting caller stopped waiting: out of the waiting set; a LEAD handed to it goes to another."""
        with self._lead_mu:
            self._waiting.discard(req)
            events = []
            while not req.events.empty():
                events.append(req.events.get_nowait())
            for event in events:
                if event is not _LEAD:
                    req.events.put(event)
            if _LEAD in events and not self._leading:
                self._pass_lead()

    def _read_one(self) -> Any:
        """Reads and routes one frame, and returns it; None once the connection has ended (every request then
        has its terminal event)."""
        try:
            frame = self.conn.recv()
            if frame is not None:
                self._route(frame)
                return frame
            reason = "it closed the connection"
        except ProtocolError as e:
            reason = f"it broke the protocol ({e})"
        except OSError as e:
            reason = f"the connection failed ({e})"
        except _UNREADABLE as e:  # what a worker's frame can make the reader raise ends that worker
            reason = f"it sent a frame corejax cannot read ({type(e).__name__}: {clean(e, 200)})"
        self._die(reason)
        return None

    def _route(self, frame: Any) -> None:
        if frame.rid == 0:
            if self._started:
                return  # start-up is over: nobody reads these any more, so nothing may pile up
            if self._startup.qsize() >= _MAX_QUEUED:
                raise ProtocolError(f"it sent more than {_MAX_QUEUED} start-up frames unread")
            self._startup.put(frame)
            return
        with self._lock:
            req = self._pending.get(frame.rid)
            if req is None:
                return
            if frame.kind == Kind.STARTED:
                req.started_at = time.monotonic()
                return  # bookkeeping only: waking the caller for it costs a thread switch
            if frame.kind in (Kind.RESULT, Kind.ERROR):
                del self._pending[frame.rid]
            elif frame.kind != Kind.CHUNK:
                raise ProtocolError(f"a worker may not send {frame.kind.name} for a request")
            else:
                req.delivered = True
            if req.events.qsize() >= _MAX_QUEUED:
                raise ProtocolError(f"it queued more than {_MAX_QUEUED} unread frames for request {frame.rid}")
        req.events.put(frame)

    def _read_startup(self) -> None:
        """The worker's frames until it is ready (or gone); then the callers read (wait)."""
        while (frame := self._read_one()) is not None:
            if frame.rid == 0 and (frame.kind == Kind.ERROR or (
                    frame.kind == Kind.READY and frame.payload.get("stage") != "policy")):
                self._started = True
                return

    def _monitor(self) -> None:
        while not self.dead:
            time.sleep(0.05)
            if self.timeout is not None:
                now = time.monotonic()
                with self._lock:
                    late = [r for r in self._pending.values()
                            if r.started_at is not None and now - r.started_at > self.timeout]
                if late:
                    self._timed_out = late[0].rid
                    self.kill(f"request {late[0].rid} ran past the {self.timeout:g} s timeout")
            if self.memory_limit is not None and self.pid is not None:
                rss = rss_bytes(self.pid)
                # What it may pin outside its RSS: files in its private folder (a tmpfs /tmp is memory). It
                # cannot fork, and memfd_create is denied (sandbox/seccomp.py), so nothing else escapes the count.
                files = folder_bytes(self._private) if self._private is not None else 0
                if rss is not None and rss + files > self.memory_limit:
                    self.kill(f"it used {(rss + files) / 2**20:.0f} MiB ({files / 2**20:.0f} MiB of it in files of "
                              f"its private folder), over the session's memory_limit of "
                              f"{self.memory_limit / 2**20:.0f} MiB")

    def kill(self, reason: str) -> None:
        """Stops the worker now; its requests fail with `reason` (the reader sees the end of the socket)."""
        if self._kill_reason is None:
            self._kill_reason = reason
        if self.proc is not None:
            try:
                self.proc.kill()
            except OSError:
                pass
            # Our end shut too: a reader blocked in recv wakes now, even if something else held the worker's
            # end open (the worker cannot fork, but the reader never waits on an end-of-file that may not come).
            try:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        else:
            self.conn.close()  # an in-process worker cannot be stopped; detach from it

    def _describe_death(self, reason: str) -> str:
        if self._kill_reason is not None:
            return f"the worker was stopped because {self._kill_reason}"
        if self.proc is None:
            return f"the in-process worker stopped: {reason}"
        if self.proc.poll() is None and "closed the connection" not in reason:
            self.proc.kill()  # alive but misbehaving: stop it, and say why
            self.proc.wait()
            return f"the worker was stopped because {reason}"
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            how = f"the worker process died from {name}"
            if -code == signal.SIGKILL:
                how += " (killed from outside, or by the kernel's out-of-memory killer)"
        else:
            how = f"the worker process exited with status {code}"
        if "closed the connection" not in reason:
            how += f"; {reason}"
        tail = self.log_tail()
        return how + (f". Its last words: {tail}" if tail else "")

    def log_tail(self, n: int = 600) -> str:
        if self._private is None:
            return ""
        try:  # from the end, at most n bytes: the worker decides how long its log is
            with open(self._private / "worker.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(f.tell() - n, 0))
                data = f.read(n)
        except OSError:
            return ""
        return clean(data.decode("utf-8", "replace").strip(), n)

    def _die(self, reason: str) -> None:
        with self._lock:
            if self.dead:
                return
            self.dead = True
        message = self._describe_death(reason)
        self._death = message
        with self._lock:
            pending, self._pending = self._pending, {}
        # Stopped for another request's timeout: a request that has not streamed anything yet is innocent,
        # and the caller has seen nothing of it, so it is re-sent like one that never started. Otherwise a
        # started request fails (it may be what crashed the worker).
        innocent = self._timed_out is not None
        for req in pending.values():
            if req.rid == self._timed_out:
                req.events.put(Terminal(Ended.TIMEOUT, message))
            elif req.started_at is None or (innocent and not req.delivered):
                req.events.put(Terminal(Ended.RETRY, message))  # safe to send to the next worker
            else:
                req.events.put(Terminal(Ended.CRASHED, message))
        self._startup.put(message)
        self.conn.close()

    def close(self) -> None:
        if not self.dead:
            try:
                self.conn.send(Kind.SHUTDOWN)
            except OSError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._kill_reason = self._kill_reason or "the session closed"
                self.proc.kill()
                self.proc.wait()
        self._kill_reason = self._kill_reason or "the session closed"
        self.conn.close()
        if self.proc is None and getattr(self, "_thread", None) is not None:
            # In-process worker: let its loop finish, then free the model here. A JAX array freed by a daemon
            # thread that interpreter shutdown is tearing down aborts the process ("exception not rethrown").
            self._thread.join(timeout=10)
            self.runtime = None
            gc.collect()
        if self.proc is not None:
            self._log.close()
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
        if getattr(self, "_weights", None) is not None:
            self._weights.discard()
