"""KV-cache quantization: int8 and packed int4 keys/values with one f32 scale per (token, kv head).

Granularity, per (token, kv head) rather than per (page, head):
- writes stay O(token): a new token never changes the scale of tokens already in its page, so a decode
  step quantizes only what it writes (a per-page scale would need the whole page requantized, or the new
  token clipped, whenever it is larger than the page's running maximum);
- accuracy: one outlier token only coarsens its own row (benchmarks/attention.py measures both);
- bytes: one f32 per (token, head), i.e. 4 / (2·head_dim) extra over int8 (3% at head_dim 64) and
  4 / (head_dim/2) over int4 (12.5% at 64, 3% at 256).

Symmetric, round-to-nearest, no zero point: keys and values after RoPE are centred near zero.

Packed int4 (`kv_dtype="int4"`): a uint8 array whose last axis is head_dim // 2; the low nibble of byte i
holds element i and the high nibble element i + head_dim // 2 ("split halves", not interleaved), so the
kernels contract each half against the matching half of q (or write each half of the output) without an
interleaving reshape. Nibbles are two's complement in [-7, 7].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KV_FORMATS = ("float", "int8", "int4")  # how pages are stored (kv_format); the user-facing kv_dtype names are corejax/types/config.py KV_DTYPES
_QMAX = {"int8": 127.0, "int4": 7.0}


def kv_format(pages: jax.Array) -> str:
    """'int8' for int8 pages, 'int4' for packed uint8 pages, 'float' otherwise."""
    if pages.dtype == jnp.int8:
        return "int8"
    if pages.dtype == jnp.uint8:
        return "int4"
    return "float"


def quantize_kv(x: jax.Array, kv_dtype: str) -> tuple[jax.Array, jax.Array]:
    """x [..., H] float -> (values, scales [...] f32); values int8 [..., H] or packed uint8 [..., H // 2].

    The quantize-on-write helper: quantize the keys/values of the tokens being written, then scatter values
    and scales into the pages at the same slots."""
    if kv_dtype not in _QMAX:
        raise ValueError(f"{kv_dtype=} must be 'int8' or 'int4'")
    x = x.astype(jnp.float32)
    qmax = _QMAX[kv_dtype]
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None]), -qmax, qmax).astype(jnp.int8)
    if kv_dtype == "int8":
        return q, scale
    h = x.shape[-1]
    if h % 2:
        raise ValueError(f"int4 KV needs an even head_dim, got {x.shape=}")
    lo = q[..., : h // 2].astype(jnp.uint8) & 0x0F
    hi = q[..., h // 2 :].astype(jnp.uint8) << 4
    return lo | hi, scale


def unpack_int4(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """packed uint8 [..., H // 2] -> (low half, high half), each int8 [..., H // 2] in [-8, 7]."""
    b = jax.lax.bitcast_convert_type(packed, jnp.int8)
    lo = jax.lax.shift_right_arithmetic(jax.lax.shift_left(b, jnp.int8(4)), jnp.int8(4))
    hi = jax.lax.shift_right_arithmetic(b, jnp.int8(4))
    return lo, hi


def dequantize_kv(values: jax.Array, scales: jax.Array) -> jax.Array:
    """Inverse of quantize_kv (up to rounding) -> f32 [..., H]; the format follows values.dtype."""
    if values.dtype == jnp.uint8:
        lo, hi = unpack_int4(values)
        values = jnp.concatenate([lo, hi], axis=-1)
    return values.astype(jnp.float32) * scales[..., None].astype(jnp.float32)
