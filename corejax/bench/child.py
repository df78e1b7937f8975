"""One runtime's measurement in a fresh process, so its peak RSS and its cold start are its own.

Parent: `run_child("corejax.bench.generation:run_llama_cpp", spec, on_step)`. The child (`python -m
corejax.bench.child TARGET`, spec as JSON on stdin) calls TARGET(spec, step) and prints `@@step` after each
measured step (the parent's progress bar) and `@@result {json}` at the end. A runner that raises
PeerMissing reports a skip with its reason instead of a result.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

STEP, RESULT, SKIP = "@@step", "@@result ", "@@skip "


class PeerMissing(Exception):
    """A peer runtime is not installed or cannot run this model: the message says why, in one line."""


class ChildFailed(RuntimeError):
    pass


def run_child(target: str, spec: dict[str, Any], on_step: Callable[[], None] = lambda: None,
              timeout: float | None = None) -> dict[str, Any]:
    """The runner's result dict; raises PeerMissing (skipped) or ChildFailed (crashed, with its stderr tail)."""
    proc = subprocess.Popen([sys.executable, "-m", "corejax.bench.child", target], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    drain.start()
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer:
        timer.start()
    result: dict[str, Any] | None = None
    skip: str | None = None
    try:
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        for line in proc.stdout:
            if line.startswith(STEP):
                on_step()
            elif line.startswith(RESULT):
                result = json.loads(line[len(RESULT):])
            elif line.startswith(SKIP):
                skip = line[len(SKIP):].strip()
        proc.wait()
    finally:
        if timer:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    drain.join(timeout=5)
    if skip is not None:
        raise PeerMissing(skip)
    if result is None or proc.returncode:
        tail = "".join(err)[-1500:].strip()
        last = tail.splitlines()[-1] if tail else "no output"
        raise ChildFailed(f"{target} exited with status {proc.returncode}: {last}" + (f"\n{tail}" if tail else ""))
    return result


def _step() -> None:
    print(STEP, flush=True)


def main(argv: list[str]) -> int:
    module, _, name = argv[0].partition(":")
    if not module.startswith("corejax.bench."):
        raise SystemExit(f"not a bench runner: {argv[0]}")
    runner = getattr(importlib.import_module(module), name)
    spec = json.loads(sys.stdin.read())
    try:
        result = runner(spec, _step)
    except PeerMissing as e:
        print(SKIP + str(e).replace("\n", " "), flush=True)
        return 0
    print(RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    # Through the module's import name, so runners raise the same PeerMissing class main() catches.
    from corejax.bench.child import main as _main

    sys.exit(_main(sys.argv[1:]))
