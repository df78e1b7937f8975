"""Float32 (or an encoder's float16) weights in column blocks (`BlockedWeight`) and their matmul: the native kernel
(kernels/small_matmul.cc, an XLA FFI custom call) for every row count — decode steps, batches of them,
speculative verifies, prefill chunks, encoder batches — when it is loaded, XLA's dot otherwise.

The kernel shares one pass over the weights among all rows (8-row register tiles, each column block read from
memory once and from L2 after) and splits column blocks over the cores through XLA's own thread pool
(kernels/parallel.h); it beats XLA's dot at every row count measured (docs/MEASUREMENTS.md;
`python benchmarks/native_kernels.py --part mlp`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from corejax.hostmem import aligned_empty, to_device

TARGET = "corejax_small_matmul"
BLOCK = 32  # columns per block (kernels/small_matmul.cc kBlock)
THREADS = 64  # at most; kernels/parallel.h caps the workers at the cores (the caller + XLA's pool)


@struct.dataclass
class BlockedWeight:
    """A [K, N] matrix stored as data [N / 32, K, 32] (data[b, k, c] = w[k, 32 b + c]), float32 or float16
    (an encoder's weights="f16"); or bfloat16 (weights="bf16") with rows in pairs, the order the kernel's
    vdpbf16ps reads and AMX's B tiles are: data.reshape(N / 32, K / 2, 32, 2)[b, i, c, t] = w[2 i + t, 32 b + c].
    Products are float32 in every case."""

    data: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        nb, k, c = self.data.shape[-3:]  # a stacked weight has a leading layer axis (corejax/models/stack.py)
        return k, nb * c

    @property
    def dtype(self):
        return self.data.dtype

    def columns(self, ids: jax.Array) -> jax.Array:
        """w[:, ids] as [*ids.shape, K] (a tied embedding's rows)."""
        return self.unpaired()[ids // BLOCK, :, ids % BLOCK]

    def unpaired(self) -> jax.Array:
        """data as [N / 32, K, 32] in plain row order (bfloat16 pairs undone), for XLA's ops."""
        if self.data.dtype != jnp.bfloat16:
            return self.data
        nb, k, c = self.data.shape
        return self.data.reshape(nb, k // 2, c, 2).transpose(0, 1, 3, 2).reshape(nb, k, c)


def to_blocked(w: jax.Array | np.ndarray) -> BlockedWeight:
    """float16 stays float16 (the kernel widens it as it reads) and bfloat16 stays bfloat16, in row pairs (K
    must be even); anything else becomes float32."""
    k, n = w.shape
    if w.dtype == jnp.bfloat16:
        if k % 2:
            raise ValueError(f"bfloat16 blocks pair rows: K = {k} must be even")
        pairs = np.asarray(w).reshape(k // 2, 2, n // BLOCK, BLOCK).transpose(2, 0, 3, 1)  # [b, i, c, t]
        return BlockedWeight(jnp.asarray(np.ascontiguousarray(pairs).reshape(n // BLOCK, k, BLOCK)))
    dtype = np.float16 if w.dtype == np.float16 else np.float32
    blocked = aligned_empty((n // BLOCK, k, BLOCK), dtype)
    blocked[...] = np.asarray(w, dtype).reshape(k, n // BLOCK, BLOCK).transpose(1, 0, 2)
    return BlockedWeight(to_device(blocked))


def blockable(w, bf16_dot: bool) -> bool:
    """bfloat16 only where the kernel multiplies it (bf16_dot: the kernel policy's); elsewhere it stays for XLA's
    dot."""
    if not (isinstance(w, jax.Array) and w.ndim == 2 and w.shape[1] % BLOCK == 0):
        return False
    if w.dtype == jnp.bfloat16:
        return bf16_dot and w.shape[0] % 2 == 0
    return w.dtype in (jnp.float32, jnp.float16)


def blocked_matmul(x: jax.Array, w: BlockedWeight, valid: jax.Array | None = None,
                   layer: jax.Array | int | None = None) -> jax.Array:
    """x [..., K] @ w -> [..., N] float32 through the native kernel (the model's dense() calls it where the kernel
    policy runs the native kernels, blocked_matmul_reference elsewhere).

    valid (bool, x.shape[:-1]), optional: rows that are padding (False) may be skipped, their outputs zero
    (the kernel skips them; XLA's dot computes them anyway). A stacked w (data [L, N / 32, K, 32]) takes
    `layer`, an int32 index the kernel reads in place."""
    k, n = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"blocked_matmul: {x.shape=} does not match the weight's [K, N] = {w.shape}")
    if (w.data.ndim == 4) != (layer is not None):
        raise ValueError(f"blocked_matmul: a stacked weight needs a layer index and only it takes one: "
                         f"{w.data.shape=} {layer=}")
    x2, flags = _rows(x, k, valid)
    y = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32))(
        x2, w.data, flags, jnp.asarray(0 if layer is None else layer, jnp.int32), threads=np.int32(THREADS))
    return y.reshape(*x.shape[:-1], n)


ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}  # kernels/vecmath.h Activation


def _rows(x: jax.Array, k: int, valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    rows = math.prod(x.shape[:-1])
    flags = jnp.ones((rows,), jnp.int32) if valid is None else valid.reshape(rows).astype(jnp.int32)
    return x.reshape(rows, k).astype(jnp.float32), flags


def fused_matmul_bias_act(x: jax.Array, w: BlockedWeight, bias: jax.Array, act: str,
                          valid: jax.Array | None = None) -> jax.Array:
    """act(x @ w + bias) in one native call (the activation runs on each column block while it is in cache).
    Native only: callers check the kernel policy (corejax/models/bert.py composes XLA ops otherwise)."""
    k, n = w.shape
    x2, flags = _rows(x, k, valid)
    y = jax.ffi.ffi_call("corejax_matmul_bias_act", jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32))(
        x2, w.data, bias.astype(jnp.float32), flags, threads=np.int32(THREADS), act=np.int32(ACTIVATIONS[act]))
    return y.reshape(*x.shape[:-1], n)


def fused_matmul_add_norm(x: jax.Array, w: BlockedWeight, bias: jax.Array, residual: jax.Array,
                          scale: jax.Array, shift: jax.Array, eps: float, valid: jax.Array | None = None) -> jax.Array:
    """LayerNorm(residual + x @ w + bias) * scale + shift in one native call. Native only, as above."""
    k, n = w.shape
    x2, flags = _rows(x, k, valid)
    f32 = jnp.float32
    y = jax.ffi.ffi_call("corejax_matmul_add_norm", jax.ShapeDtypeStruct((x2.shape[0], n), f32))(
        x2, w.data, bias.astype(f32), residual.reshape(-1, n).astype(f32), scale.astype(f32), shift.astype(f32),
        flags, threads=np.int32(THREADS), eps=np.float32(eps))
    return y.reshape(*x.shape[:-1], n)


def blocked_matmul_reference(x: jax.Array, w: BlockedWeight, layer: jax.Array | int | None = None) -> jax.Array:
    """XLA's dot over the same blocks: the kernel's reference, and the path where the policy runs XLA's ops."""
    if layer is not None:
        w = BlockedWeight(w.data[layer])
    k, n = w.shape
    dense = jnp.transpose(w.unpaired(), (1, 0, 2)).reshape(k, n).astype(jnp.float32)
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32), dense, preferred_element_type=jnp.float32)
