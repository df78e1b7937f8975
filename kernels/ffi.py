"""Loads the native kernels' library (built by corejax/native.py) and registers its XLA FFI targets.

Each kernel module asks `available(TARGET)` at trace time and falls back to XLA's own ops when the library
is not loaded (no compiler, COREJAX_NATIVE=0, a GPU backend)."""

from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path

import jax

# FFI target name -> the handler symbol in the library (kernels/*.cc XLA_FFI_DEFINE_HANDLER_SYMBOL).
TARGETS = {"corejax_small_matmul": "CorejaxSmallMatmul", "corejax_paged_attention": "CorejaxPagedAttention",
           "corejax_quant_matmul": "CorejaxQuantMatmul", "corejax_quant_matmul_experts": "CorejaxQuantMatmulExperts",
           "corejax_matmul_bias_act": "CorejaxMatmulBiasAct", "corejax_matmul_add_norm": "CorejaxMatmulAddNorm",
           "corejax_encoder_attention": "CorejaxEncoderAttention", "corejax_lazy_zeros": "CorejaxLazyZeros"}
_LOCK = threading.Lock()
_loaded: list[str] = []
_lib: list[ctypes.CDLL] = []
_bf16_dot: list[bool] = []
_isa: list[str] = []
_build_allowed = [True]


def forbid_build() -> None:
    """In the sandboxed worker: never start a compiler (the policy forbids exec); load what the parent built."""
    _build_allowed[0] = False


def load(path: str | Path) -> bool:
    with _LOCK:
        if _loaded:
            return True
        try:
            lib = ctypes.CDLL(str(path))
            for target, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            bf16 = bool(lib.corejax_bf16_dot())
            lib.corejax_isa.restype = ctypes.c_char_p
            isa = lib.corejax_isa().decode() + ("+amx" if lib.corejax_amx() else "")
        except (OSError, AttributeError) as e:
            print(f"corejax: cannot load the native kernels from {path}: {e}; using XLA's own ops", file=sys.stderr)
            return False
        _loaded.append(str(path))
        _lib.append(lib)
        _bf16_dot.append(bf16)
        _isa.append(isa)
        return True


def ensure(path: str | Path | None = None) -> bool:
    """Loads the library: from `path` if given, else built for this machine (unless building is forbidden)."""
    if _loaded:
        return True
    if jax.default_backend() != "cpu":
        return False
    if path is None and _build_allowed[0]:
        from corejax import native

        path = native.build()
    return load(path) if path is not None else False


def library() -> ctypes.CDLL | None:
    """The loaded library itself, for its plain C entry points (kernels/ggml_repack.py), or None."""
    return _lib[0] if _lib else None


def library_key() -> str:
    """Names the loaded kernel build (its file name carries a hash of sources, compiler and CPU), or "xla"."""
    return Path(_loaded[0]).stem if _loaded else "xla"


def available() -> bool:
    """The library is loaded and serves this process: a CPU backend with one device (the kernels are
    single-device custom calls; a model sharded over devices runs XLA's own ops, corejax/engine/sharding.py)."""
    return bool(_loaded) and jax.default_backend() == "cpu" and jax.device_count() == 1


def isa() -> str:
    """The kernel path the loaded library runs (kernels/isa.h: "avx512_vnni", "avx2", "neon_dotprod", ...; with
    "+amx" where batches of rows multiply on AMX tiles), or "xla" when none is loaded (XLA's own ops)."""
    return _isa[0] if available() else "xla"


def fast_quant() -> bool:
    """The loaded quantized matmul has a SIMD integer-dot path (not the scalar reference): only then do
    quantized weights beat float32 on XLA (default_weights)."""
    return available() and _isa[0] != "scalar"


def bf16_dot() -> bool:
    """The loaded kernels multiply bfloat16 weights (weights="bf16": built where the CPU has AVX512_BF16)."""
    return available() and _bf16_dot[0]
