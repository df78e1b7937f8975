"""GGUF Q4_0 / Q4_1 / Q8_0 blocks straight into the quantized matmul's layout (kernels/ggml_repack.cc), through
ctypes: plain C functions of the native library, no XLA. `repack` returns None where the library is not loaded
or the format is not one of these, and the caller takes the NumPy path (corejax/weights/quant.py from_blocks)."""

from __future__ import annotations

import ctypes

import numpy as np

FORMATS = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}  # ggml's type ids


def _lib() -> ctypes.CDLL | None:
    from corejax.kernels import ffi

    return ffi.library() if ffi.ensure() else None


def _ptr(a: np.ndarray | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if a is None else a.ctypes.data)


def code_range(raw: np.ndarray, fmt: str, d_in: int) -> tuple[int, int] | None:
    """(smallest, largest) code of a [rows, row_bytes] tensor, or None where the native path cannot serve."""
    lib = _lib()
    if lib is None or fmt not in FORMATS:
        return None
    raw = np.ascontiguousarray(raw)
    out = np.zeros(2, np.int32)
    if lib.corejax_ggml_code_range(ctypes.c_int32(FORMATS[fmt]), _ptr(raw), ctypes.c_int64(raw.shape[0]),
                                   ctypes.c_int64(d_in), _ptr(out)):
        return None
    return int(out[0]), int(out[1])


def repack(raw: np.ndarray, fmt: str, d_in: int, offset: int, bits: int, codes: np.ndarray, scales: np.ndarray,
           mins: np.ndarray | None) -> bool:
    """Writes codes [ceil(rows / 16), d_in * bits / 32, 64] uint8, scales (and mins, Q4_1) [groups, d_in / 32, 16]
    float16 from raw [rows, row_bytes]; False where the native path cannot serve (nothing written)."""
    lib = _lib()
    if lib is None or fmt not in FORMATS:
        return False
    raw = np.ascontiguousarray(raw)
    for a, dtype in ((codes, np.uint8), (scales, np.float16), (mins, np.float16)):
        if a is not None and (a.dtype != dtype or not a.flags.c_contiguous or not a.flags.writeable):
            raise ValueError(f"repack needs writable contiguous {np.dtype(dtype).name} outputs")
    return lib.corejax_ggml_repack(ctypes.c_int32(FORMATS[fmt]), _ptr(raw), ctypes.c_int64(raw.shape[0]),
                                   ctypes.c_int64(d_in), ctypes.c_int32(offset), ctypes.c_int32(bits), _ptr(codes),
                                   _ptr(scales), _ptr(mins)) == 0
