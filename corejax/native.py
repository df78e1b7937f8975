"""Builds the native CPU kernels (kernels/*.cc) once per machine into the corejax cache. Imports no JAX.

XLA's FFI lets a jitted program call a C++ function: kernels/small_matmul.cc (decode-sized matmuls) and
kernels/paged_decode.cc (decode attention over the paged cache); each file's header says why. They are
compiled into one library with the system's C++ compiler against the FFI headers jaxlib ships,
for this CPU (-march=native), and cached under a key of the source, compiler, jaxlib version and CPU
flags. A sandboxed worker cannot run a compiler (its seccomp policy forbids exec), so the Session builds
the library before starting the worker and lets the worker read it; in-process runtimes build it
themselves. Without a compiler — or with COREJAX_NATIVE=0 — everything runs on XLA's own ops.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SOURCES = ("small_matmul.cc", "paged_decode.cc", "quant_matmul.cc", "encoder_attention.cc")
HEADERS = ("parallel.h", "vecmath.h")  # included by the sources; part of the build key
_LOCK = threading.Lock()
_BUILT: dict[str, Path | None] = {}


def enabled() -> bool:
    return os.environ.get("COREJAX_NATIVE", "1") != "0"


def _kernels_dir() -> Path:
    spec = importlib.util.find_spec("corejax.kernels")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def _include_dir() -> Path | None:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "include"
    return path if (path / "xla" / "ffi" / "api" / "ffi.h").is_file() else None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def build() -> Path | None:
    """The kernels' shared library for this machine, compiled on first use; None when it cannot be built
    (no compiler, no FFI headers, disabled), with the reason on stderr once."""
    name = "corejax_native"
    with _LOCK:
        if name not in _BUILT:
            _BUILT[name] = _build(name) if enabled() else None
        return _BUILT[name]


def _build(name: str) -> Path | None:
    from corejax.hub import cache_dir

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    include = _include_dir()
    sources = [_kernels_dir() / f for f in SOURCES]
    headers = [_kernels_dir() / f for f in HEADERS]
    if cxx is None or include is None or not all(f.is_file() for f in sources + headers):
        print(f"corejax: not building the native kernels ({'no C++ compiler' if cxx is None else 'no FFI headers' if include is None else 'no source'}); "
              "XLA's own ops are used instead", file=sys.stderr)
        return None
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    texts = [f.read_text() for f in sources + headers]
    key = hashlib.sha256("\0".join([*texts, cxx, version, " ".join(flags), _cpu_flags(),
                                    importlib.metadata.version("jaxlib")]).encode()).hexdigest()[:16]
    out_dir = cache_dir() / "native"
    target = out_dir / f"{name}-{key}.so"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.partial")
    os.close(fd)
    cmd = [cxx, *flags, f"-I{include}", *map(str, sources), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        proc = None
        error = str(e)
    if proc is None or proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        detail = error if proc is None else proc.stderr[-2000:]
        print(f"corejax: building the native kernels failed; XLA's own ops are used instead.\n"
              f"{' '.join(cmd)}\n{detail}", file=sys.stderr)
        return None
    os.replace(tmp, target)
    return target
