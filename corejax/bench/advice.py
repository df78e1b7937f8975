"""What to do when a runtime does not run in `corejax bench`: one sentence per way it fails, and for llama.cpp
the build of llama-cpp-python that runs on this CPU.

llama-cpp-python compiles ggml with `-march=native` by default (GGML_NATIVE), AMX kernels included where the
CPU reports AMX. On the virtual machines here that build crashes in ggml-cpu on the first prompt (SIGSEGV, or
SIGILL in the AMX kernel) although the CPU has the instructions; a build with each instruction set named
explicitly from /proc/cpuinfo and AMX off runs (../shared/PERF-NOTES.md, "Building the llama.cpp peer").
"""

from __future__ import annotations

import platform
from collections.abc import Iterable

# ggml's CMake options (ggml/CMakeLists.txt) -> the /proc/cpuinfo flags each needs. GGML_AVX512 compiles
# with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw; the AVX-512 extensions need it as well.
_X86_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vbmi")),
    ("GGML_AVX512_VNNI", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512_vnni")),
    ("GGML_AVX512_BF16", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512_bf16")),
)
_AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")  # always off: the kernels that crashed
_PIP_PACKAGES = {"llama.cpp": "llama-cpp-python", "transformers": "torch transformers",
                 "onnxruntime": "onnxruntime onnx", "sentence-transformers": "sentence-transformers",
                 "hf-tokenizers": "tokenizers"}


def _is_x86(machine: str) -> bool:
    return machine.lower() in ("x86_64", "amd64", "i386", "i686")


def llama_cpp_cmake_args(flags: Iterable[str], machine: str | None = None) -> str:
    """The CMAKE_ARGS that build llama.cpp for a CPU with these /proc/cpuinfo flags: GGML_NATIVE off, each
    x86 instruction set on exactly where the CPU has it, AMX off."""
    have = set(flags)
    args = ["-DGGML_NATIVE=OFF"]
    if _is_x86(machine or platform.machine()):
        args += [f"-D{option}={'ON' if have.issuperset(needs) else 'OFF'}" for option, needs in _X86_OPTIONS]
        args += [f"-D{option}=OFF" for option in _AMX_OPTIONS]
    return " ".join(args)


def llama_cpp_rebuild_command(flags: Iterable[str], version: str | None = None, machine: str | None = None) -> str:
    """A ready-to-paste pip command that rebuilds llama-cpp-python for this CPU. The installed version is kept
    (the peer's figures stay comparable across runs) and so are its dependencies (--no-deps: a forced
    reinstall would otherwise reinstall numpy and the rest too, maybe at other versions)."""
    pin = f"=={version}" if version else ""
    return (f'CMAKE_ARGS="{llama_cpp_cmake_args(flags, machine)}" pip install --force-reinstall --no-cache-dir '
            f"--no-deps llama-cpp-python{pin}")


def advice(runtime: str, status: str, *, others: Iterable[str] = (), flags: Iterable[str] = (),
           version: str | None = None, timeout: float | None = None) -> str | None:
    """What to do about `runtime` ending with `status` ("crashed", "timeout", "failed"; None for "missing" and
    "unsupported", whose reason says it). others: the suite's other runtimes (for a --runtimes that leaves
    this one out); flags: /proc/cpuinfo's; version: the installed package's."""
    if status not in ("crashed", "timeout", "failed"):
        return None
    if runtime.startswith("corejax"):
        return ("this is a corejax failure, not a peer's: report it with the output above (the record keeps its "
                "last lines in output_tail)")
    leave_out = f"--runtimes {' '.join(dict.fromkeys(others))}" if others else "--runtimes without it"
    slow = ("if it was only slow, give it longer with --peer-timeout SECONDS"
            + (f" (it had {timeout:g} s per step)" if timeout else ""))
    if runtime == "llama.cpp":
        rebuild = ("rebuild llama-cpp-python for this CPU (the default -march=native build, AMX included, "
                   "crashes in ggml-cpu on some virtual machines; it compiles from source, several minutes):\n"
                   + llama_cpp_rebuild_command(flags, version))
        return f"{slow}; if ggml hung, {rebuild}" if status == "timeout" else rebuild
    if status == "timeout":
        return f"{slow}; otherwise leave it out with {leave_out}"
    package = _PIP_PACKAGES.get(runtime, runtime)
    return (f"reinstall it (pip install --force-reinstall --no-cache-dir --no-deps {package}) or leave it out "
            f"with {leave_out}")
