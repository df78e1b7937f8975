"""Paged attention on a CPU through the native kernel kernels/paged_attention.cc, for any number of query
positions (a decode step, a speculative verify, a prefill chunk), reading float32 or bfloat16 KV pages in place
from the whole cache, split over the cores (kernels/parallel.h). kernels/paged_attention.py is its reference
and the path for everything else (int8/int4 pages, GPUs, no native library)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from corejax.kernels.paged_attention import paged_attention
from corejax.kernels.quant_matmul import usable_threads

TARGET = "corejax_paged_attention"


def supported(q: jax.Array, k_pages: jax.Array) -> bool:
    """Whether the native kernel serves this call (where the kernel policy runs the native kernels): float32
    or bfloat16 pages (also as their uint16 bits)."""
    return k_pages.dtype in (jnp.float32, jnp.bfloat16, jnp.uint16) and q.ndim == 4


def paged_attention_native(
    q: jax.Array,  # [B, T, N, H]
    k_pages: jax.Array,  # [L, K, P, page_size, H] float32, or bfloat16 (or its bits as uint16): the whole cache
    v_pages: jax.Array,  # [L, K, P, page_size, H]
    layer: jax.Array | int,
    page_table: jax.Array,  # [B, pages_per_seq] int32
    lengths: jax.Array,  # [B] int32
    q_positions: jax.Array,  # [B, T] int32
    *,
    window: jax.Array | int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Same contract as paged_attention on layer `layer` of the cache -> [B, T, N, H] in q's dtype. layer and
    window may be traced (a layer loop's index and that layer's window): the kernel reads them at run time."""
    b, t, n, h = q.shape
    if k_pages.ndim != 5 or k_pages.shape != v_pages.shape or k_pages.shape[-1] != h or n % k_pages.shape[1]:
        raise ValueError(f"paged_attention_native needs k_pages, v_pages [L, K, P, page_size, H]: {q.shape=} "
                         f"{k_pages.shape=}")
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((b, t, n, h), jnp.float32))(
        q.astype(jnp.float32), k_pages, v_pages, page_table.astype(jnp.int32), lengths.astype(jnp.int32),
        q_positions.astype(jnp.int32), jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(window, jnp.int32)]),
        scale=np.float32(scale), softcap=np.float32(softcap), threads=np.int32(usable_threads()))
    return out.astype(q.dtype)


def paged_attention_native_reference(q, k_pages, v_pages, layer, page_table, lengths, q_positions, *, window=0,
                                     scale=None, softcap=0.0) -> jax.Array:
    return paged_attention(q, k_pages, v_pages, page_table, lengths, q_positions, window=window, layer=layer,
                           scale=scale, softcap=softcap, impl="lax")
