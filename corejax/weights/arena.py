"""Device arrays the loader writes in place: a quantized GGUF's layers go straight into their stacked arrays.

`device_empty` makes a new array on the CPU device from the native library's lazy zeros (kernels/lazy_zeros.cc:
memory committed only as it is written) and hands back a writable NumPy view of its buffer, for a buffer no
program has read yet. `Arena` holds one stacked array per parameter and gives each layer its slot as the layer is
converted (weights/quant.py from_ggml writes there); models/stack.py `adopt`s the whole array when a parameter's
slots are exactly its layers in order, so the layer loop's weights are written once and never copied. Why:
building per-layer arrays and then the stacked copy cost an 8B model's load 7.8 s of its 21 s and a second copy
of the largest parameter at the peak (docs/MEASUREMENTS.md, Memory model).
"""

from __future__ import annotations

import ctypes
from typing import Any

import jax
import numpy as np


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
