"""Float32 weights in column blocks (`BlockedWeight`) and their matmul: the native weight-streaming kernel
(kernels/small_matmul.cc, an XLA FFI custom call) for up to MAX_ROWS rows — decode steps, batches of them,
speculative verifies — and XLA's dot for more (prefill).

Measured on this 2-core AMD EPYC (AVX-512), quiet machine, a 30-layer SmolLM2-shaped float32 MLP stack
(318 MB) per call, median ms (`python benchmarks/native_kernels.py`):

    rows      1     2     4     8    16    32
    XLA     11.4  17.0  17.5  20.4  27.0  39.6
    native  12.9  12.6  13.2  15.0  27.8  53.4

so the kernel takes 2-8 rows (one row is a wash; XLA keeps 16 and more).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from corejax.kernels import ffi

TARGET = "corejax_small_matmul"
BLOCK = 32  # columns per block (kernels/small_matmul.cc kBlock)
MAX_ROWS = 8  # up to this many rows go to the kernel (at 16-32 rows XLA's GEMM was as fast or faster)
CALL_ROWS = 8


@struct.dataclass
class BlockedWeight:
    """A float32 [K, N] matrix stored as data [N / 32, K, 32] (data[b, k, c] = w[k, 32 b + c])."""

    data: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        nb, k, c = self.data.shape
        return k, nb * c

    @property
    def dtype(self):
        return self.data.dtype

    def columns(self, ids: jax.Array) -> jax.Array:
        """w[:, ids] as [*ids.shape, K] (a tied embedding's rows)."""
        return self.data[ids // BLOCK, :, ids % BLOCK]


def to_blocked(w: jax.Array | np.ndarray) -> BlockedWeight:
    k, n = w.shape
    return BlockedWeight(jnp.asarray(np.ascontiguousarray(
        np.asarray(w, np.float32).reshape(k, n // BLOCK, BLOCK).transpose(1, 0, 2))))


def blockable(w) -> bool:
    return isinstance(w, jax.Array) and w.ndim == 2 and w.dtype == jnp.float32 and w.shape[1] % BLOCK == 0


def blocked_matmul(x: jax.Array, w: BlockedWeight) -> jax.Array:
    """x [..., K] @ w -> [..., N] float32: the native kernel for up to MAX_ROWS rows, XLA's dot beyond."""
    k, n = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"blocked_matmul: {x.shape=} does not match the weight's [K, N] = {w.shape}")
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, k).astype(jnp.float32)
    if rows > MAX_ROWS or not ffi.available():
        y = jnp.einsum("mk,bkc->mbc", x2, w.data, preferred_element_type=jnp.float32)
        return y.reshape(*x.shape[:-1], n)
    parts = []
    for start in range(0, rows, CALL_ROWS):
        part = x2[start:start + CALL_ROWS]
        m = part.shape[0]
        padded = 1 << (m - 1).bit_length()
        if padded != m:
            part = jnp.pad(part, ((0, padded - m), (0, 0)))
        y = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((padded, n), jnp.float32))(part, w.data)
        parts.append(y[:m])
    y = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    return y.reshape(*x.shape[:-1], n)


def blocked_matmul_reference(x: jax.Array, w: BlockedWeight) -> jax.Array:
    k, n = w.shape
    dense = jnp.transpose(w.data, (1, 0, 2)).reshape(k, n)
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32), dense, preferred_element_type=jnp.float32)


MATMUL_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def block_decoder_params(params: dict) -> dict:
    """The decoder's float32 projection matrices (and the LM head) as BlockedWeights, converted one at a
    time with each original freed at once, so loading never holds two copies of the model."""
    def convert(w):
        if not blockable(w):
            return w
        blocked = to_blocked(w)
        w.delete()
        return blocked

    out = dict(params)
    out["layers"] = [{key: convert(v) if key in MATMUL_KEYS else v for key, v in layer.items()}
                     for layer in params["layers"]]
    if "lm_head" in params:
        out["lm_head"] = convert(params["lm_head"])
    return out
