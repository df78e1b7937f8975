"""Host arrays handed to JAX without a second copy, and the heap given back after loading.

A loaded weight is built in NumPy (unpacked, regrouped for the kernels, stacked over layers); `jnp.asarray` would
then copy it into a JAX buffer, so each weight briefly existed twice. On the CPU backend JAX can adopt a NumPy
buffer through DLPack instead, if it is 64-byte aligned and C-contiguous: `aligned_empty` makes such arrays and
`to_device` adopts them (anything else is copied, as before). Weights are never donated to a program, so an
adopted buffer stays valid; it is freed with the last array that holds it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import jax
import numpy as np

ALIGN = 64


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + n].view(dtype).reshape(shape)


def to_device(a: np.ndarray) -> jax.Array:
    """a as a jax.Array on the CPU: the same memory when it can be adopted (aligned, contiguous, writable, a dtype
    DLPack knows), else a copy."""
    if (jax.default_backend() == "cpu" and isinstance(a, np.ndarray) and a.flags.c_contiguous and a.flags.writeable
            and a.ctypes.data % ALIGN == 0 and a.size):
        try:
            return jax.dlpack.from_dlpack(a)
        except (BufferError, TypeError, ValueError, RuntimeError):
            pass
    return jax.device_put(a)


def trim_heap() -> None:
    """Returns the heap's free pages to the system (glibc's malloc_trim): loading frees many per-layer arrays that
    would otherwise stay resident. A no-op where the C library has no malloc_trim."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass
