"""Host arrays for the loader, and the heap given back after loading.

A loaded weight is built in NumPy (unpacked, regrouped for the kernels, stacked over layers) and copied into a
JAX buffer one array at a time (`to_device`), so no more than one weight exists twice at once. JAX could adopt
an aligned NumPy buffer through DLPack instead of copying it (`aligned_empty` makes such arrays), but adopted
buffers crashed about one interpreter exit in ten ("terminate called ... exception not rethrown", jax 0.10.2,
CPU), so weights are copied.
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


def device_empty(shape: tuple[int, ...], dtype) -> tuple[jax.Array, np.ndarray] | None:
    """A new array on the default device whose memory is committed only as it is written (the native library's
    lazy zeros, kernels/lazy_zeros.cc), and a writable NumPy view of that memory: the loader fills a stacked
    weight in place, one layer at a time, instead of building it in NumPy and copying it (a second copy of the
    largest weight at the peak, and one more pass over it). Only for a buffer no program has read yet. None
    where the library is not loaded or the device is not this process's host memory."""
    from corejax.kernels import ffi

    device = jax.local_devices()[0]
    if device.platform != "cpu" or not ffi.available():
        return None
    a = jax.device_put(jax.ffi.ffi_call("corejax_lazy_zeros", jax.ShapeDtypeStruct(shape, dtype))(), device)
    a.block_until_ready()
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if n == 0:
        return a, np.zeros(shape, dtype)
    buf = (ctypes.c_uint8 * n).from_address(a.unsafe_buffer_pointer())
    return a, np.frombuffer(buf, np.uint8).view(dtype).reshape(shape)


def trim_heap() -> None:
    """Returns the heap's free pages to the system (glibc's malloc_trim): loading frees many per-layer arrays that
    would otherwise stay resident. A no-op where the C library has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))  # the C library already loaded; no lookup subprocess
    except (OSError, AttributeError):
        pass
