"""Bidirectional attention for encoders, read straight from the fused [q | k | v] projection rows, through
the native kernel kernels/encoder_attention.cc (its header says why). corejax/models/bert.py uses it when the
library is loaded; kernels/flash_attention.py (non-causal, padding keys masked) is the reference and the
path everywhere else."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "corejax_encoder_attention"
THREADS = 64  # at most; kernels/parallel.h caps the workers at the cores


def encoder_attention(qkv: jax.Array, lengths: jax.Array, heads: int, scale: float | None = None) -> jax.Array:
    """qkv [B, T, 3 D] (row = [q | k | v], each N heads of H = D / N), lengths [B] (right padding)
    -> [B, T, D] float32: softmax(q k^T * scale) v over each sequence's real tokens; padding rows zero."""
    b, t, d3 = qkv.shape
    if d3 % (3 * heads):
        raise ValueError(f"encoder_attention: {qkv.shape=} is not [B, T, 3 * heads * H] with {heads=}")
    d = d3 // 3
    scale = 1.0 / math.sqrt(d // heads) if scale is None else scale
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((b, t, d), jnp.float32))(
        qkv.astype(jnp.float32), lengths.astype(jnp.int32), heads=np.int32(heads), scale=np.float32(scale),
        threads=np.int32(THREADS))
