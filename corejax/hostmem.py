"""Host arrays for the loader, and the heap given back after loading.

A weight that needs no repacking is built in NumPy and copied into a JAX buffer one array at a time
(`to_device`), so no more than one weight exists twice at once. A quantized GGUF's layers are written once,
straight into their stacked device arrays (corejax/weights/arena.py), and models/stack.py adopts them whole. JAX could adopt an
aligned NumPy buffer through DLPack instead, but adopted buffers crashed about one interpreter exit in ten
("terminate called ... exception not rethrown", jax 0.10.2, CPU), so the buffers here are JAX's own.
"""

from __future__ import annotations

import ctypes

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
    """a copied into a jax.Array on the default device (committed there, as every program output is)."""
    return jax.device_put(a, jax.local_devices()[0])


def trim_heap() -> None:
    """Returns the heap's free pages to the system (glibc's malloc_trim): loading frees many per-layer arrays that
    would otherwise stay resident. A no-op where the C library has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))  # the C library already loaded; no lookup subprocess
    except (OSError, AttributeError):
        pass
