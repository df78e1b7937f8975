"""Host arrays for the loader, and the heap given back after loading.

A weight that needs no repacking is built in NumPy and copied into a JAX buffer one array at a time
(`to_device`), so no more than one weight exists twice at once. A quantized GGUF's layers are written once,
straight into their stacked device arrays (`Arena`, `device_empty`: a writable view of a buffer no program has
read yet, memory committed as it is written), and models/stack.py adopts those arrays whole. JAX could adopt an
aligned NumPy buffer through DLPack instead, but adopted buffers crashed about one interpreter exit in ten
("terminate called ... exception not rethrown", jax 0.10.2, CPU), so the buffers here are JAX's own.
"""

from __future__ import annotations

import ctypes
from typing import Any

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


class Slot(np.ndarray):
    """Layer `index` of a stacked device array being filled (Arena): a writable NumPy view of its memory that
    keeps the array alive. A per-layer param holds it until models/stack.py stacks the layers, which adopts the
    whole array when its slots are exactly the layers in order (no copy), else copies it like any host array."""

    owner: jax.Array
    index: int


class Arena:
    """Stacked destinations [layers, ...] for one parameter's leaves, allocated when its first layer is
    converted (device_empty: memory committed as layers are written) and handed out a layer at a time, so a
    loaded model's layers are written once, where the layer loop reads them."""

    def __init__(self, layers: int):
        self.layers = layers
        self._by_key: dict[str, tuple[list, list, set]] = {}

    def slots(self, key: str, index: int, shapes: list[tuple[tuple[int, ...], Any]]) -> list[Slot] | None:
        """Layer `index`'s views for leaves of these (shape, dtype)s, or None (no native memory, another
        layout than the key's first layer had, or a slot already taken)."""
        spec = [(tuple(shape), np.dtype(dtype)) for shape, dtype in shapes]
        entry = self._by_key.get(key)
        if entry is None:
            made = [device_empty((self.layers, *shape), dtype) for shape, dtype in spec]
            if any(m is None for m in made):
                return None
            entry = self._by_key[key] = (spec, made, set())
        have, made, taken = entry
        if have != spec or index in taken or not 0 <= index < self.layers:
            return None
        taken.add(index)
        out = []
        for array, view in made:
            slot = view[index].view(Slot)
            slot.owner, slot.index = array, index
            out.append(slot)
        return out


def adopt(parts: list[Any]) -> jax.Array | None:
    """The stacked array whose slots `parts` are, exactly and in order, or None."""
    if not parts or not all(isinstance(p, Slot) for p in parts):
        return None
    owner = parts[0].owner
    if owner.shape[0] != len(parts) or any(p.owner is not owner or p.index != i for i, p in enumerate(parts)):
        return None
    return owner


def trim_heap() -> None:
    """Returns the heap's free pages to the system (glibc's malloc_trim): loading frees many per-layer arrays that
    would otherwise stay resident. A no-op where the C library has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))  # the C library already loaded; no lookup subprocess
    except (OSError, AttributeError):
        pass
