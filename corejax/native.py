"""Builds the native CPU kernels (kernels/*.cc) once per machine into the corejax cache. Imports no JAX.

XLA's FFI lets a jitted program call a C++ function: the kernels/*.cc files in SOURCES (float and quantized
matmuls, attention over the paged cache, encoder attention, the KV pool's lazily zeroed allocation);
each file's header says why. They are compiled into one library with the system's C++ compiler against the FFI headers jaxlib ships,
for this CPU (-march=native), and cached under a key of the source, compiler, jaxlib version and CPU
flags. COREJAX_ISA picks a narrower target than the machine's own (ISAS below), so the AVX2 path can be
built, measured and tested on an AVX-512 machine. A sandboxed worker cannot run a compiler (its seccomp policy forbids exec), so the Session builds
the library before starting the worker and lets the worker read it; in-process runtimes build it
themselves. Without a compiler — or with COREJAX_NATIVE=0 — everything runs on XLA's own ops.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SOURCES = ("small_matmul.cc", "paged_attention.cc", "quant_matmul.cc", "encoder_attention.cc", "lazy_zeros.cc",
           "ggml_repack.cc")
HEADERS = ("parallel.h", "vecmath.h", "isa.h", "amx.h")  # included by the sources; part of the build key

# COREJAX_ISA -> (the compiler's target flags, the /proc/cpuinfo flags the CPU must have, XLA's own cap).
# "native" (the default) builds for exactly this CPU; the others build the named path of kernels/isa.h, and
# also cap XLA's code generation (--xla_cpu_max_isa) so the whole program runs as on such a machine. A path
# the CPU cannot run is refused. x86-64-v3 is AVX2 + FMA + F16C + BMI1/2 (Haswell, Zen 1 and later).
X86_ISAS = {
    "avx512": (["-march=native"], ("avx512f", "avx512bw"), None),
    "avx_vnni": (["-march=x86-64-v3", "-mavxvnni", "-mtune=native"], ("avx2", "fma", "f16c", "avx_vnni"), "AVX2"),
    "avx2": (["-march=x86-64-v3", "-mtune=native"], ("avx2", "fma", "f16c", "bmi2"), "AVX2"),
    "scalar": (["-march=x86-64", "-mtune=native", "-DCOREJAX_SCALAR"], (), "SSE4_2"),
}
ARM_ISAS = {
    "neon_dotprod": (["-march=armv8.2-a+dotprod"], ("asimddp",), None),
    "neon": (["-march=armv8-a"], (), None),
    "scalar": (["-march=armv8-a", "-DCOREJAX_SCALAR"], (), None),
}
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


def requested_isa() -> str:
    return os.environ.get("COREJAX_ISA", "native").strip().lower() or "native"


def isa_target(isa: str | None = None) -> tuple[list[str], str | None]:
    """(compiler flags, XLA's --xla_cpu_max_isa or None) for COREJAX_ISA (or `isa`); raises
    InvalidParameterError for a name this architecture lacks or a path this CPU cannot run."""
    from corejax.errors import InvalidParameterError

    isa = isa or requested_isa()
    if isa == "native":
        return ["-march=native"], None
    arm = platform.machine().lower() in ("aarch64", "arm64")
    table = ARM_ISAS if arm else X86_ISAS
    if isa not in table:
        raise InvalidParameterError(f"COREJAX_ISA={isa!r} is not a kernel path on this {platform.machine()} "
                                    f"machine; use native or one of {', '.join(table)}")
    flags, needs, xla = table[isa]
    have = set(_cpu_flags().split(":", 1)[-1].split())
    missing = [f for f in needs if f not in have]
    if missing:
        raise InvalidParameterError(f"COREJAX_ISA={isa} needs CPU features this machine lacks "
                                    f"({', '.join(missing)}); pick a narrower path (e.g. avx2) or unset it")
    return list(flags), xla


def cap_xla_isa() -> None:
    """With a narrower COREJAX_ISA, XLA generates code for that ISA too: called by the worker before its JAX
    backend starts (worker/main.py; worker/start.py for in-process runtimes, where it takes effect only if the
    process has not started JAX yet). A bad COREJAX_ISA is left for build() to refuse, with its sentence."""
    try:
        _, xla = isa_target()
    except Exception:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if xla and "xla_cpu_max_isa" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_max_isa={xla}".strip()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def build(isa: str | None = None) -> Path | None:
    """The kernels' shared library for this machine (for COREJAX_ISA's path, or `isa`'s), compiled on first
    use; None when it cannot be built (no compiler, no FFI headers, disabled), with the reason on stderr once.
    A path this CPU cannot run raises InvalidParameterError."""
    isa = isa or requested_isa()
    name = "corejax_native" if isa == "native" else f"corejax_{isa}"
    with _LOCK:
        if name not in _BUILT:
            target, _ = isa_target(isa)  # checked once: a refused path raises here, before anything is cached
            _BUILT[name] = _build(name, target) if enabled() else None
        return _BUILT[name]


def _build(name: str, target: list[str]) -> Path | None:
    from corejax.paths import cache_dir

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    include = _include_dir()
    sources = [_kernels_dir() / f for f in SOURCES]
    headers = [_kernels_dir() / f for f in HEADERS]
    if cxx is None or include is None or not all(f.is_file() for f in sources + headers):
        print(f"corejax: not building the native kernels ({'no C++ compiler' if cxx is None else 'no FFI headers' if include is None else 'no source'}); "
              "XLA's own ops are used instead", file=sys.stderr)
        return None
    flags = ["-O3", *target, "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
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
