"""The worker: the only process that opens model files and imports JAX. Started by the Session as
`python -m corejax.worker.main --fd N ...` (a fresh interpreter, never a fork), it applies the policy while
it still has one thread, then loads the model and serves requests over the inherited socket.

`serve` is the loop itself; Session(sandbox=False) runs it in a thread of the caller's process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Nothing here may import numpy, JAX or the model code at module level: the policy must be applied while
# the process has a single thread (Landlock binds only the calling thread), and numpy's BLAS starts threads.


def _error_payload(e: BaseException) -> dict:
    from corejax.wire.messages import error_to_wire

    return error_to_wire(e)


class WorkerLoop:
    """Reads requests and streams replies by request id: generations each on a thread of their own (the
    runtime's scheduler batches them), everything else in arrival order on the reading thread itself.

    Why not a reader thread feeding a queue: handing a frame between two Python threads costs a lock wake-up
    (a few percent of a sentence embedding; docs/MEASUREMENTS.md has the figure). What it gives up: a CANCEL
    that arrives while a non-generation request runs (an embedding, a zero-shot classification) is read when
    that request ends; generations keep streaming meanwhile.

    poll_s: after answering a request, watch the socket this long (busy: select with a zero timeout) before
    blocking in recv: waking a process asleep in recv is a large part of a small request's round trip on a
    virtual machine. Bounded, and only after non-generation requests. The sandboxed worker polls for 1 ms; the
    in-process loop does not (its caller is a thread of the same process: nothing to gain, and the poll would
    hold the GIL between its syscalls)."""

    def __init__(self, conn, runtime: Any | None, *, poll_s: float = 0.0, describe: str | None = None):
        self.conn = conn
        self.runtime = runtime
        self.describe = describe  # a GGUF file whose header DESCRIBE reads (a worker started to describe it)
        self.poll_s = poll_s
        self.cancelled: set[int] = set()

    def serve(self) -> None:
        from corejax.wire.protocol import Kind, ProtocolError

        try:
            while (frame := self.conn.recv()) is not None:
                if frame.kind == Kind.CANCEL:
                    self.cancelled.add(frame.rid)
                    if self.runtime is not None:
                        self.runtime.cancel(frame.rid)  # a queued or running generation frees its pages now
                elif frame.kind == Kind.SHUTDOWN:
                    break
                elif frame.rid in self.cancelled:
                    self.cancelled.discard(frame.rid)
                elif frame.kind == Kind.GENERATE:
                    # Each generation streams from its own thread; the scheduler batches them into shared steps.
                    threading.Thread(target=self._serve_one, args=(frame,), name=f"corejax-generate-{frame.rid}",
                                     daemon=True).start()
                elif not self._serve_one(frame):
                    break
                elif self.poll_s:
                    self._await_next()
        except (OSError, ProtocolError):
            pass  # the parent is trusted: a broken frame from it means it is gone

    def _await_next(self) -> None:
        import select
        import time

        end = time.perf_counter() + self.poll_s
        while time.perf_counter() < end:
            if select.select([self.conn.sock], [], [], 0)[0]:
                return

    def _serve_one(self, frame) -> bool:
        """Runs one request to its last frame; False when the socket is gone."""
        from corejax.wire.protocol import Kind

        try:
            self.conn.send(Kind.STARTED, frame.rid)
            self._handle(frame)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the caller as an ERROR frame
            try:
                self.conn.send(Kind.ERROR, frame.rid, _error_payload(e))
            except OSError:
                return False  # the socket is gone: the parent closed or died
        finally:
            self.cancelled.discard(frame.rid)
        return True

    def _handle(self, frame) -> None:
        from corejax.wire import messages as p
        from corejax.wire.protocol import Kind

        rid, msg = frame.rid, p.read_request(frame)
        reply = lambda result: self.conn.send(Kind.RESULT, rid, result.to_wire())  # noqa: E731
        if msg.KIND == Kind.PING:
            return reply(p.Value())
        if msg.KIND == Kind.DESCRIBE and self.describe is not None:
            from corejax.loading.loader import describe_gguf

            return reply(p.Info(describe_gguf(Path(self.describe))))
        if self.runtime is None:
            raise _sandbox_error(f"this worker has no model loaded; it cannot serve {msg.KIND.name}")
        rt = self.runtime
        if isinstance(msg, p.Generate):
            stream = rt.stream(msg.prompt, msg.messages, msg.sampling, speculative=msg.speculative, tag=rid,
                               tools=msg.tools)
            try:
                for chunk in stream:
                    if rid in self.cancelled:
                        return
                    if chunk.result is not None:
                        reply(p.Generated(chunk.result))
                    else:
                        self.conn.send(Kind.CHUNK, rid, p.chunk_to_wire(chunk))
            finally:
                stream.close()
        elif isinstance(msg, p.Tokenize):
            reply(p.Tokens(rt.tokenizer.encode(msg.text, add_special=msg.add_special)))
        elif isinstance(msg, p.Detokenize):
            reply(p.Text(rt.tokenizer.decode([int(i) for i in msg.ids])))
        elif msg.KIND == Kind.INFO:
            reply(p.Info(rt.info()))
        elif isinstance(msg, p.Embed):
            reply(p.Embeddings(rt.embed(msg.texts, truncate=msg.truncate)))
        elif isinstance(msg, p.Classify):
            labels, scores = rt.classify(msg.texts, msg.labels, head=msg.head, multi_label=msg.multi_label,
                                         template=msg.template, truncate=msg.truncate)
            reply(p.Scores(labels, scores))
        else:
            raise _sandbox_error(f"a worker does not accept {msg.KIND.name} frames")

def _sandbox_error(message: str) -> Exception:
    from corejax.errors import SandboxError

    return SandboxError(message)


def load_runtime(name: str, fmt: str, path: str, options: dict | None = None,
                 report: Callable[[str, int, int], None] | None = None) -> Any:
    """options (plain data from the parent): weights, the EngineConfig fields under "engine", memory_limit
    (bytes), which open_runtime reserves against before it allocates (corejax/worker/memory.py), and output_filter
    (the blocklist's patterns)."""
    from corejax.types.config import EngineConfig
    from corejax.types.filter import Blocklist
    from corejax.hub import ModelSource
    from corejax.kernels import ffi
    from corejax.types.weights_file import from_options
    from corejax.worker.start import open_runtime

    options = options or {}
    ffi.ensure(options.get("native_kernels"))  # the native kernels the parent built, if any
    report = report if options.get("progress") else None  # -> PROGRESS frames, the parent's bars
    patterns = options.get("output_filter")
    runtime = open_runtime(ModelSource(name, fmt, Path(path)), weights=options.get("weights"),
                           engine=EngineConfig(**options.get("engine", {})), progress=report or False,
                           memory_limit=options.get("memory_limit"),
                           output_filter=None if patterns is None else Blocklist(patterns),
                           **({"weights_cache": from_options(options["weights_cache"])}
                              if "weights_cache" in options else {}))  # a sandboxed worker's, from its parent
    if options.get("warmup"):
        runtime.warmup(report, batches=options["warmup"] == "batches")
    return runtime


def _reporter(conn: Any) -> Callable[[str, int, int], None]:
    from corejax.wire.protocol import Kind

    return lambda stage, done, total: conn.send(Kind.PROGRESS, 0, {"stage": stage, "done": done, "total": total})


def _join(options: dict) -> bool:
    """One process of a cluster (options["cluster"]): joins the others before anything else touches JAX."""
    from corejax.engine import distributed
    from corejax.types.cluster import Cluster

    cluster = Cluster.from_wire(options.get("cluster"))
    if cluster is not None:
        distributed.join(cluster)
    return cluster is not None


def _serve(conn, runtime: Any, loop_class: type = WorkerLoop, **loop: Any) -> None:
    """The request loop; a follower of a cluster instead runs the leader's steps until the leader leaves."""
    from corejax.engine import distributed

    if runtime is not None and getattr(runtime, "follower", False):
        runtime.follow()
    else:
        loop_class(conn, runtime, **loop).serve()
    distributed.leave()


def serve_in_process(sock, source, on_loaded: Callable[[Any], None] | None = None,
                     options: dict | None = None) -> None:
    """Session(sandbox=False): the same loop on a thread of this process, with no policy."""
    from corejax.wire.protocol import Connection, Kind

    conn = Connection(sock)
    try:
        conn.send(Kind.READY, 0, {"pid": os.getpid(), "report": [], "stage": "policy"})
        _join(options or {})
        runtime = (load_runtime(source.name, source.format, str(source.path), options, _reporter(conn))
                   if source is not None else None)
        if on_loaded is not None:
            on_loaded(runtime)
        conn.send(Kind.READY, 0, {"pid": os.getpid(), "stage": "loaded"})
    except Exception as e:  # noqa: BLE001
        try:
            conn.send(Kind.ERROR, 0, _error_payload(e))
        finally:
            conn.close()
        return
    _serve(conn, runtime)
    conn.close()


def main(argv: list[str] | None = None, loop_class: type = WorkerLoop) -> None:
    """The sandboxed worker process. loop_class: the request loop (the test suite's probe worker passes its own,
    tests/probe_worker.py; corejax's own loop refuses every kind it does not serve)."""
    ap = argparse.ArgumentParser(prog="python -m corejax.worker.main")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--model", nargs=3, metavar=("NAME", "FORMAT", "PATH"))
    ap.add_argument("--options", default="{}", help="JSON: weights and engine config for loading the model")
    ap.add_argument("--private", required=True, help="the read-write folder (TMPDIR, the XLA cache)")
    ap.add_argument("--writable", action="append", default=[])
    ap.add_argument("--read", action="append", default=[])
    ap.add_argument("--no-netns", action="store_true")
    args = ap.parse_args(argv)

    from corejax import native

    native.cap_xla_isa()  # before JAX starts its backend in this process (COREJAX_ISA narrower than the CPU)
    from corejax.sandbox import policy

    policy.set_parent_death_signal()
    if os.getppid() != args.parent:
        os._exit(1)  # the parent died before the death signal was armed
    import socket

    sock = socket.socket(fileno=args.fd)
    model_paths = [args.model[2]] if args.model else []
    options = json.loads(args.options)
    from corejax.types.cluster import Cluster

    layers = policy.apply(model_paths=model_paths, private_dirs=[args.private, *args.writable],
                          extra_read=args.read, network_namespace=not args.no_netns,
                          cluster=Cluster.from_wire(options.get("cluster")))
    # From here on the process is restricted; only now may numpy, JAX and the model code be imported.
    from corejax.kernels import ffi

    ffi.forbid_build()  # no compiler may run in here; the parent built the native kernels
    from corejax.wire.protocol import Connection, Kind

    conn = Connection(sock)
    if any(layer.name == "single_thread" for layer in layers):
        conn.send(Kind.READY, 0, {"pid": os.getpid(), "report": [lay.as_dict() for lay in layers], "stage": "policy"})
        conn.send(Kind.ERROR, 0, {"type": "SandboxError", "message": (
            "the worker had several threads before its policy was applied, so Landlock would bind only one; "
            "refusing to open the model")})
        os._exit(2)
    try:
        if _join(options):  # a cluster's connections are all open now: no new one from here on
            layers.append(policy.close_network())
    except Exception as e:  # noqa: BLE001
        conn.send(Kind.READY, 0, {"pid": os.getpid(), "report": [lay.as_dict() for lay in layers], "stage": "policy"})
        conn.send(Kind.ERROR, 0, _error_payload(e))
        conn.close()
        os._exit(3)
    conn.send(Kind.READY, 0, {"pid": os.getpid(), "report": [lay.as_dict() for lay in layers], "stage": "policy"})
    describe = args.model[2] if args.model and options.get("describe") else None
    try:
        runtime = load_runtime(*args.model, options, _reporter(conn)) if args.model and not describe else None
    except Exception as e:  # noqa: BLE001
        conn.send(Kind.ERROR, 0, _error_payload(e))
        conn.close()
        os._exit(3)
    conn.send(Kind.READY, 0, {"pid": os.getpid(), "stage": "loaded"})
    _serve(conn, runtime, loop_class, poll_s=0.001, describe=describe)
    conn.close()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: JAX's threads can make a normal exit slow


if __name__ == "__main__":
    main()
