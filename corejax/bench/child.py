"""One runtime's measurement in a fresh process, so its peak RSS and its cold start are its own, and so a peer
that crashes or hangs takes only itself down.

Parent: `run_child("corejax.bench.generation:run_llama_cpp", spec, on_step, timeout=300)`. The child (`python -m
corejax.bench.child TARGET`, spec as JSON on stdin) calls TARGET(spec, step) and prints `@@step` after each
measured step (the parent's progress bar, and the timeout's clock) and `@@result {json}` at the end. A runner
that raises PeerMissing reports a skip (`@@skip {json}`: its reason and status) instead of a result.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from corejax.paths import python_command

STEP, RESULT, SKIP = "@@step", "@@result ", "@@skip "
TAIL_LINES, TAIL_CHARS = 20, 2000  # how much of a failed child's output its report keeps
DUMP_SIGNAL = signal.SIGUSR1  # a child dumps its threads' Python stacks on it (before a timeout's kill)


class PeerMissing(Exception):
    """A peer runtime is not installed or cannot run this model: the message says why, in one line.

    status: "missing" (not installed), "unsupported" (installed, cannot run this model or format) or "failed"
    (installed, but importing it fails, as a broken build does)."""

    def __init__(self, reason: str, status: str = "missing"):
        super().__init__(reason)
        self.status = status


class ChildFailed(RuntimeError):
    """The child ended without a result. status: "crashed" (killed by a signal: `signal`, e.g. "SIGSEGV"),
    "timeout" (no progress for the timeout; killed) or "failed" (exited with `returncode`, e.g. a traceback).
    `what` says it in words; `output_tail` holds the last lines of its stderr and stdout; `steps` how many steps
    it finished."""

    def __init__(self, target: str, status: str, what: str, returncode: int | None, signal_name: str | None,
                 output_tail: str, steps: int):
        super().__init__(f"{target}: {what}" + (f"\n{output_tail}" if output_tail else ""))
        self.target, self.status, self.what, self.returncode = target, status, what, returncode
        self.signal, self.output_tail, self.steps = signal_name, output_tail, steps


def import_peer(module: str, package: str) -> ModuleType:
    """`import module`, or PeerMissing: "missing" when `package` is not installed, "failed" (with the error) when
    it is but importing it raises, as a build against the wrong libraries does."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a broken build raises ImportError, OSError or RuntimeError
        try:
            absent = importlib.util.find_spec(module.partition(".")[0]) is None
        except (ImportError, ValueError):
            absent = True
        if absent and isinstance(e, ImportError):
            raise PeerMissing(f"{package} is not installed (pip install 'corejax[bench]')") from None
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise PeerMissing(f"{package} is installed but `import {module}` fails: {type(e).__name__}: {first}",
                          status="failed") from None


def _signal_words(returncode: int) -> tuple[str, str]:
    """('SIGSEGV', 'segmentation fault') for a child killed by signal -returncode."""
    try:
        sig = signal.Signals(-returncode)
    except ValueError:
        return f"signal {-returncode}", "unknown signal"
    words = signal.strsignal(sig) or sig.name
    return sig.name, words[:1].lower() + words[1:]


def _where(proc: subprocess.Popen) -> None:
    """Asks a hung child for the Python stack of each of its threads (main() registered faulthandler for
    DUMP_SIGNAL), so its output says where it hung, and gives it a second to write them."""
    try:
        os.kill(proc.pid, DUMP_SIGNAL)
        proc.wait(timeout=1)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass


def _kill(proc: subprocess.Popen) -> None:
    """The child and anything it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_child(target: str, spec: dict[str, Any], on_step: Callable[[], None] = lambda: None,
              timeout: float | None = None) -> dict[str, Any]:
    """The runner's result dict; raises PeerMissing (skipped) or ChildFailed (crashed, timed out or failed).

    timeout: the seconds the child may go without finishing a step (loading counts towards the first); past
    it the child is killed. None: no limit. on_step is called from a reader thread."""
    # Its own process group: a timeout kills whatever the runner started too, and the terminal's Ctrl-C
    # reaches only this process, which then kills the child below.
    proc = subprocess.Popen(python_command("corejax.bench.child", target), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)  # stderr and stdout, as they come
    got: dict[str, Any] = {"steps": 0}
    deadline = [time.monotonic() + timeout] if timeout else None

    def read() -> None:
        for line in proc.stdout:
            if line.startswith(STEP):
                got["steps"] += 1
                if deadline:
                    deadline[0] = time.monotonic() + timeout
                on_step()
            elif line.startswith(RESULT):
                got["result"] = json.loads(line[len(RESULT):])
            elif line.startswith(SKIP):
                got["skip"] = json.loads(line[len(SKIP):])
            else:
                tail.append(line)

    def feed() -> None:
        try:
            proc.stdin.write(json.dumps(spec))
            proc.stdin.close()
        except OSError:  # it died before reading its spec (a broken pipe); its output says why
            pass

    # The pipes in threads, this thread waits for the process (and the timeout): neither a child that hangs
    # before reading its spec nor a process it left behind holding the pipes open can keep the bench waiting.
    pipes = [threading.Thread(target=fn, daemon=True) for fn in (feed, read, lambda: tail.extend(proc.stderr))]
    for pipe in pipes:
        pipe.start()
    timed_out = False
    try:
        while True:
            try:
                proc.wait(timeout=None if deadline is None else max(0.05, deadline[0] - time.monotonic()))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline[0]:
                    timed_out = True
                    _where(proc)
                    break
    finally:
        _kill(proc)  # the child on a timeout or an interrupt; what it left running in any case
        proc.wait()
    end = time.monotonic() + 5
    for pipe in pipes:
        pipe.join(timeout=max(0.0, end - time.monotonic()))
    if "skip" in got:
        raise PeerMissing(got["skip"]["reason"], got["skip"].get("status", "missing"))
    if "result" in got and not proc.returncode and not timed_out:
        return got["result"]
    output = "".join(tail)[-TAIL_CHARS:].strip()
    rc, sig = proc.returncode, None
    if timed_out:
        status, what = "timeout", f"made no progress for {timeout:g} s and was killed"
    elif rc is not None and rc < 0:
        sig, words = _signal_words(rc)
        status, what = "crashed", f"killed by {sig} ({words})"
    else:
        last = output.splitlines()[-1].strip() if output else "no output"
        status, what = "failed", f"exited with status {rc}: {last}"
    raise ChildFailed(target, status, what, rc, sig, output, got["steps"])


def _step() -> None:
    print(STEP, flush=True)


def main(argv: list[str]) -> int:
    import faulthandler

    faulthandler.enable()  # a crash in a peer's native code prints the Python stack it happened under
    faulthandler.register(DUMP_SIGNAL, all_threads=True)  # and so does a hang, when the parent asks
    module, _, name = argv[0].partition(":")
    if not module.startswith("corejax.bench."):
        raise SystemExit(f"not a bench runner: {argv[0]}")
    runner = getattr(importlib.import_module(module), name)
    spec = json.loads(sys.stdin.read())
    try:
        result = runner(spec, _step)
    except PeerMissing as e:
        print(SKIP + json.dumps({"reason": str(e).replace("\n", " "), "status": e.status}), flush=True)
        return 0
    print(RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    # Through the module's import name, so runners raise the same PeerMissing class main() catches.
    from corejax.bench.child import main as _main

    sys.exit(_main(sys.argv[1:]))
