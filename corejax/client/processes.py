"""The worker process seen from the parent: started from one long-lived thread, and read from /proc (its
memory, its threads' sandbox state) where the worker itself cannot fake the answers."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from pathlib import Path
from typing import Any

_spawn_requests: queue.Queue = queue.Queue()
_spawner_lock = threading.Lock()
_spawner: threading.Thread | None = None


def _spawner_loop() -> None:
    while True:
        args, kwargs, reply = _spawn_requests.get()
        try:
            reply.put(subprocess.Popen(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            reply.put(e)


def spawn(*args: Any, **kwargs: Any) -> subprocess.Popen:
    """Popen from one long-lived thread: the worker's parent-death signal fires when the *thread* that
    started it exits, so a worker started from a short-lived caller thread would die with that thread."""
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_spawner_loop, name="corejax-spawner", daemon=True)
            _spawner.start()
    reply: queue.Queue = queue.Queue()
    _spawn_requests.put((args, kwargs, reply))
    result = reply.get()
    if isinstance(result, BaseException):
        raise result
    return result


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def thread_status(pid: int) -> dict[str, int]:
    """Read from outside the worker, so a compromised worker cannot fake it: per-thread NoNewPrivs, Seccomp."""
    nnp = filt = total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {"threads": 0, "no_new_privs": 0, "seccomp_filter": 0}
    for tid in tids:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        total += 1
        nnp += fields.get("NoNewPrivs", "").strip() == "1"
        filt += fields.get("Seccomp", "").strip() == "2"
    return {"threads": total, "no_new_privs": nnp, "seccomp_filter": filt}
