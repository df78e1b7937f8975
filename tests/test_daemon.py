"""`corejax generate`'s keep-alive server (corejax/daemon.py): the second run of a command finds the model loaded
in the background server and prints the same text as an in-process run; the server leaves when idle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ARGS = ["-n", "12", "--greedy", "The capital of France is"]


def _generate(*args: str, keep_alive: str) -> tuple[str, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", "from corejax.cli import main; raise SystemExit(main())",
                           "generate", "-q", "--keep-alive", keep_alive, *args], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, COREJAX_KEEP_ALIVE="300"))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, time.monotonic() - start


def _servers(socket_path: Path) -> list[int]:
    """Pids of the keep-alive servers listening on socket_path."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"--uds\0{socket_path}\0".encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


def _kept(*args: str):
    from corejax.cli import build_parser, kept_server_for

    return kept_server_for(build_parser().parse_args(["generate", "-q", *args, "x"]))


def test_second_run_uses_the_kept_server(smollm2_gguf):
    kept = _kept("--kv-dtype", "bf16")  # its own server: bf16 KV is no other test's key
    for pid in _servers(kept.socket):
        os.kill(pid, signal.SIGTERM)
    try:
        first, first_s = _generate(*ARGS, "--kv-dtype", "bf16", keep_alive="60")
        server = _servers(kept.socket)
        assert kept.alive() and len(server) == 1
        second, second_s = _generate(*ARGS, "--kv-dtype", "bf16", keep_alive="60")
        assert _servers(kept.socket) == server  # the same process answered: nothing was started or loaded again
        local, _ = _generate(*ARGS, "--kv-dtype", "bf16", keep_alive="0")
        assert first == second == local and "Paris" in first
        assert second_s < first_s / 2  # no JAX import, no load, no compile (paired in one test, as a ratio)
    finally:
        for pid in _servers(kept.socket):
            os.kill(pid, signal.SIGTERM)


def test_the_kept_server_leaves_when_idle(smollm2_gguf):
    kept = _kept("--kv-dtype", "int8")
    for pid in _servers(kept.socket):
        os.kill(pid, signal.SIGTERM)
    _generate(*ARGS, "--kv-dtype", "int8", keep_alive="2s")
    pids = _servers(kept.socket)
    assert len(pids) == 1
    deadline = time.monotonic() + 60
    while _servers(kept.socket) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not _servers(kept.socket), "the keep-alive server did not leave after 2 s idle"
    assert not kept.alive()


def test_bad_keep_alive_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-c", "from corejax.cli import main; raise SystemExit(main())",
                           "generate", "--keep-alive", "soon", "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "keep-alive must be" in proc.stderr
