"""Startup suite: what a new process pays before its text, with the model kept loaded (keep-alive, the default)
and without. Each sample is a fresh process, timed whole by this one: `corejax generate -n 16` (wall and the
client's peak RSS) and a Python script calling corejax.stream (its first piece and wall, and whether it imported
JAX). The first kept run starts the kept server and is recorded apart; runs alternate kept / own worker, so
drift on a shared machine hits both alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

PROMPT = "The capital of France is"
TOKENS = 16
SCRIPT = r"""
import json, sys, time
t = time.perf_counter()
import corejax
first = None
for piece in corejax.stream(sys.argv[1], model=sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0,
                            keep_alive=float(sys.argv[4])):
    first = first if first is not None else time.perf_counter() - t
print(json.dumps({"first_s": first, "jax": "jax" in sys.modules}))
"""


def steps(ctx: Any) -> int:
    return 1 + 2 * ctx.reps


# Prepended to a `python -c` program: its own peak RSS (VmHWM, since its exec) on stderr as it exits. wait4's
# ru_maxrss would not do: a child's maximum starts from its parent's RSS at the fork.
_PEAK = ("import atexit, sys; atexit.register(lambda: sys.stderr.write('@@peak_kb %s\\n' % [l.split()[1] "
         "for l in open('/proc/self/status') if l.startswith('VmHWM')][0])); ")


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, the process's own peak RSS in MB, its stdout) of one fresh `python -c` process."""
    cmd = [cmd[0], cmd[1], _PEAK + cmd[2], *cmd[3:]]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env, check=False)
    wall = time.perf_counter() - t
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-6:])} exited with {proc.returncode}: {err[-800:]}")
    peak = [line.split()[1] for line in err.splitlines() if line.startswith("@@peak_kb ")]
    return wall, int(peak[-1]) / 1024 if peak else float("nan"), proc.stdout.decode()


def run(ctx: Any) -> None:
    from corejax import hub
    from corejax.client import keepalive
    from corejax.paths import python_command

    path = str(hub.resolve(ctx.model, progress=False).path)
    env = {k: v for k, v in os.environ.items() if k != keepalive.KEEP_ALIVE_ENV}
    cli = python_command("corejax.cli", "generate", "-q", "-m", path, "-n", str(TOKENS), "--greedy", PROMPT)
    script = [sys.executable, "-c", SCRIPT, PROMPT, path, str(TOKENS)]
    keepalive.stop([path])
    try:
        wall, rss, _ = _run([*cli, "--keep-alive", "300"], env)
        ctx.add("startup", "first run (starts the kept server)", "corejax (kept)", "wall_s", [wall], "s", "lower")
        ctx.step()
        walls: dict[str, list[float]] = {"corejax (kept)": [], "corejax (own worker)": []}
        rsses: dict[str, list[float]] = {"corejax (kept)": [], "corejax (own worker)": []}
        firsts: dict[str, list[float]] = {"corejax (kept)": [], "corejax (own worker)": []}
        script_walls: dict[str, list[float]] = {"corejax (kept)": [], "corejax (own worker)": []}
        imported: list[float] = []
        for _ in range(ctx.reps):
            for label, keep in (("corejax (kept)", "300"), ("corejax (own worker)", "0")):
                wall, rss, _ = _run([*cli, "--keep-alive", keep], env)
                walls[label].append(wall)
                rsses[label].append(rss)
                wall, _, out = _run([*script, keep], env)
                reply = json.loads(out.splitlines()[-1])
                firsts[label].append(reply["first_s"])
                script_walls[label].append(wall)
                if label == "corejax (kept)":
                    imported.append(float(reply["jax"]))
                ctx.step()
        for label in walls:
            ctx.describe("startup", label, {"keep_alive_s": 300 if "kept" in label else 0, "sandbox": True})
            ctx.add("startup", f"corejax generate -n {TOKENS}", label, "wall_s", walls[label], "s", "lower")
            ctx.add("startup", f"corejax generate -n {TOKENS}", label, "client_peak_rss_mb", rsses[label], "MB",
                    "lower")  # the command's own process; its own worker's memory is not in it
            ctx.add("startup", f"script: Session + stream {TOKENS}", label, "first_piece_s", firsts[label], "s",
                    "lower")
            ctx.add("startup", f"script: Session + stream {TOKENS}", label, "wall_s", script_walls[label], "s",
                    "lower")
        ctx.add("startup", f"script: Session + stream {TOKENS}", "corejax (kept)", "client_imported_jax", imported,
                "bool", "lower")
    finally:
        keepalive.stop([path])
