"""This machine: its fingerprint (CPU, flags, cores, memory, versions), memory bandwidth, and process RSS."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

# /proc/cpuinfo flags that decide which kernels XLA, oneDNN, ggml and torch can use.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "avx512vbmi", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
              "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16")
PEER_PACKAGES = ("llama_cpp_python", "transformers", "torch", "onnxruntime", "sentence-transformers",
                 "tokenizers", "gguf", "matplotlib", "pytest-benchmark")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and every flag /proc/cpuinfo lists (empty where there is none)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "CPU part") and model in ("unknown", "", platform.machine()):
                model = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    return model, flags


def cpu_flags() -> set[str]:
    """Every flag of /proc/cpuinfo (x86 `flags`, Arm `Features`)."""
    return _cpuinfo()[1]


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def fingerprint() -> dict[str, Any]:
    """Every field the schema requires. Imports JAX to ask for its backend and devices."""
    import corejax

    cpu, all_flags = _cpuinfo()
    flags = [f for f in SIMD_FLAGS if f in all_flags]
    try:
        import jax

        backend, devices = jax.default_backend(), [str(d) for d in jax.devices()]
        from corejax.kernels import ffi

        ffi.ensure()
        isa = ffi.isa()
    except Exception as e:  # noqa: BLE001 - a broken JAX install is recorded, not fatal to the peers' numbers
        backend, devices, isa = f"unavailable ({type(e).__name__})", [], "xla"
    return {
        "cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count() or 1, "usable_cores": usable_cores(),
        "memory_bytes": _memory_bytes(), "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "numpy": np.__version__, "jax": _version("jax"), "jaxlib": _version("jaxlib"), "backend": backend,
        "devices": devices, "corejax": corejax.__version__, "kernel_isa": isa,
        "packages": {name: _version(name) for name in PEER_PACKAGES},
        "load_average": load_average(),
    }


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: other work on the machine makes every number here noisier, and
    runtimes that spin OpenMP threads (llama.cpp, torch) suffer from it the most."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def memory_bandwidth(mib: int = 512, reps: int = 5, threads: int | None = None) -> dict[str, list[float]]:
    """GB/s samples of reading (sum) and copying a `mib`-MiB float64 array, split across `threads` threads
    (default: the usable cores). numpy releases the GIL in both loops, so the threads run in parallel.
    Decode reads every weight once per token, so 'read' is the roofline's denominator."""
    threads = threads or usable_cores()
    a = np.ones((mib << 20) // 8, np.float64)
    b = np.empty_like(a)
    bounds = np.linspace(0, a.size, threads + 1).astype(int)

    def parallel(fn) -> float:
        workers = [threading.Thread(target=fn, args=(bounds[i], bounds[i + 1])) for i in range(threads)]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t

    read = lambda s, e: a[s:e].sum()  # noqa: E731
    copy = lambda s, e: np.copyto(b[s:e], a[s:e])  # noqa: E731
    parallel(read), parallel(copy)  # first touch: page faults are not bandwidth
    out: dict[str, list[float]] = {"read": [], "copy": []}
    for _ in range(reps):
        out["read"].append(a.nbytes / parallel(read) / 1e9)
        out["copy"].append(2 * a.nbytes / parallel(copy) / 1e9)  # read + write, as STREAM counts it
    return out


def peak_rss_bytes(pid: int | None = None) -> int:
    """Peak resident memory (VmHWM) of this process, or of process `pid`, in bytes.

    Not getrusage: Linux carries ru_maxrss across fork and exec, so a child started by a large parent
    would report at least the parent's peak."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        if pid is not None:
            raise
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
