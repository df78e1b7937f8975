"""What a sandboxed worker is started with: its environment (only what the worker needs; tokens, credentials and
proxies stay behind) and its command line (the files and folders its sandbox lets it read or write)."""

from __future__ import annotations

import json
import os
import site
import sys
from pathlib import Path
from typing import Any

from corejax.paths import PACKAGE_ROOT

# Environment names passed to the worker; everything else stays behind.
_ENV_PREFIXES = ("JAX_", "XLA_", "TF_CPP_", "CUDA_", "NVIDIA_", "TPU_")
_ENV_NAMES = ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH", "COREJAX_SECCOMP_LOG")


def worker_env(tmp: Path, xla: Path, pythonpath: tuple[str, ...]) -> dict[str, str]:
    """tmp: the worker's private HOME and TMPDIR; xla: its private copy of the program cache."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES}
    user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    # The folder the corejax package is imported from, then the caller's extra folders.
    paths = [str(PACKAGE_ROOT), *pythonpath] + [p for p in (user_site,) if p and p in sys.path and os.path.isdir(p)]
    env.update(
        HOME=str(tmp), TMPDIR=str(tmp), PYTHONPATH=os.pathsep.join(paths), PYTHONDONTWRITEBYTECODE="1",
        OPENBLAS_NUM_THREADS="1",  # numpy's BLAS would start threads before the policy binds them
        JAX_COMPILATION_CACHE_DIR=str(xla), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        # XLA's own caches would live under (and put into every program's key) the private copy's path,
        # which is new for each worker: every program would miss. None of them, then.
        JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES="none",
    )
    env.setdefault("LANG", "C.UTF-8")
    return env


def worker_argv(module: str, fd: int, tmp: Path, xla: Path, source: Any, options: dict, env: dict[str, str],
                pythonpath: tuple[str, ...], network_namespace: bool, extra: tuple[str, ...] = ()) -> list[str]:
    """The worker's command line: extra are more sandbox arguments (the weights cache's staging folder)."""
    cmd = [sys.executable, "-m", module, "--fd", str(fd), "--parent", str(os.getpid()), "--private", str(tmp),
           "--writable", str(xla), *extra]
    if source is not None:
        cmd += ["--model", source.name, source.format, str(source.path), "--options", json.dumps(options)]
    for key in ("draft_read", "native_kernels"):  # the speculative draft model, the native kernels
        if options.get(key):
            cmd += ["--read", str(options[key])]
    for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep):  # its shared libraries, not whole folders
        if d and os.path.isabs(d) and os.path.isdir(d):
            cmd += [a for f in sorted(os.listdir(d)) if ".so" in f and os.path.isfile(os.path.join(d, f))
                    for a in ("--read", os.path.join(d, f))]
    for p in pythonpath:  # extra folders the worker imports from (the test suite's probes), read-only
        cmd += ["--read", str(p)]
    if not network_namespace:
        cmd.append("--no-netns")
    return cmd
