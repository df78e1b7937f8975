"""KV caches as pytrees with one method the models call: write this step's keys/values, then attend.

The models never index the cache themselves: `cache.attend(...)` is the seam where the dense reference
cache (here) and the paged cache with its flash/paged kernels plug in, so both serve the same forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from corejax.types.config import KV_DTYPES, QUANTIZED_KV, ModelConfig
from corejax.kernels import paged_native
from corejax.kernels.kv_quant import quantize_kv
from corejax.kernels.paged_attention import paged_attention, paged_impl
from corejax.kernels.policy import Kernels, current
from corejax.kernels.flash_attention import flash_attention_reference


@struct.dataclass
class DenseKVCache:
    """One contiguous [max_len] slot per batch row. Position p of row b lives at index p.

    k, v: [num_layers, batch, max_len, num_kv_heads, head_dim]
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> DenseKVCache:
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def attend(
        self,
        layer: jax.Array | int,
        q: jax.Array,  # [B, T, N, H], already rotated
        k: jax.Array,  # [B, T, K, H], already rotated
        v: jax.Array,  # [B, T, K, H]
        positions: jax.Array,  # [B, T] absolute positions of these tokens
        *,
        window: jax.Array | int,
        scale: float,
        softcap: float,
    ) -> tuple[jax.Array, DenseKVCache]:
        """Stores k/v at their positions in layer `layer`, then attends q to everything stored -> [B, T, N, H]."""
        rows = jnp.arange(q.shape[0])[:, None]  # [B, 1]
        new_k = self.k.at[layer, rows, positions].set(k.astype(self.k.dtype), mode="drop")
        new_v = self.v.at[layer, rows, positions].set(v.astype(self.v.dtype), mode="drop")
        key_positions = jnp.broadcast_to(jnp.arange(self.max_len), (q.shape[0], self.max_len))
        out = flash_attention_reference(  # the explicit [T, S] scores: what the tiled kernels are checked against
            q, new_k[layer], new_v[layer], positions, key_positions, window=window, scale=scale, softcap=softcap
        )
        return out, DenseKVCache(k=new_k, v=new_v)


# Query rows per block of BidirectionalAttention's explicit scores: [B, N, rows, T] at a time, not [B, N, T, T].
_BIDIRECTIONAL_ROWS = 256


@struct.dataclass
class BidirectionalAttention:
    """No cache: a decoder block run as an encoder (EmbeddingGemma, EncoderConfig.decoder). attend() is full
    bidirectional attention over each sequence's real keys, as transformers runs use_bidirectional_attention:
    global layers see every key, a sliding layer of window W the keys within W // 2 positions on either side
    (transformers' Gemma3TextConfig turns sliding_window into W // 2 + 1, an exclusive bound on |q - k|).

    key_positions: [B, T] each token's position, -1 for padding (never visible; padding queries are unread)."""

    key_positions: jax.Array

    def attend(self, layer: jax.Array | int, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, *,
               window: jax.Array | int, scale: float, softcap: float) -> tuple[jax.Array, BidirectionalAttention]:
        """q [B, T, N, H], k/v [B, T, K, H] (rotated), positions [B, T] -> [B, T, N, H] float32. Scores are
        explicit, in blocks of query rows (memory [B, N, rows, T]); window may be traced (the layer loop)."""
        b, t, n, h = q.shape
        kv_heads = k.shape[2]
        rows = _BIDIRECTIONAL_ROWS if t % _BIDIRECTIONAL_ROWS == 0 else t
        kp = self.key_positions[:, None, None, None, :]  # [B, 1, 1, 1, T]
        kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)

        def block(args):
            qb, qp = args  # [B, rows, K, G, H], [B, rows]
            s = jnp.einsum("BTKGH,BSKH->BKGTS", qb, kf) * scale
            if softcap:
                s = jnp.tanh(s / softcap) * softcap
            d = jnp.abs(qp[:, None, None, :, None] - kp)
            vis = (kp >= 0) & ((window <= 0) | (d <= window // 2))
            p = jax.nn.softmax(jnp.where(vis, s, -jnp.inf), axis=-1)
            p = jnp.where(vis, p, 0.0)  # a row that sees nothing (padding) gives 0, not NaN
            return jnp.einsum("BKGTS,BSKH->BTKGH", p, vf)

        qg = q.astype(jnp.float32).reshape(b, t // rows, rows, kv_heads, n // kv_heads, h)
        qp = positions.reshape(b, t // rows, rows)
        out = jax.lax.map(block, (jnp.moveaxis(qg, 1, 0), jnp.moveaxis(qp, 1, 0)))  # [blocks, B, rows, K, G, H]
        return jnp.moveaxis(out, 0, 1).reshape(b, t, n, h), self




def _zeros(shape: tuple[int, ...], dtype, place: Any = None, lazy: bool = False) -> jax.Array:
    """A zero array for the page pool: lazy (the native kernels loaded), one whose memory is committed only as
    pages are written (kernels/lazy_zeros.cc), so a pool sized for the whole context costs what the sequences use.

    Committed to the device (or `place`, a sharding) from the start, as every later version of the pool (a
    program's output) is: an uncommitted first pool made the first prefill program compile twice (JAX keys
    programs on it)."""
    place = place or jax.local_devices()[0]
    if isinstance(place, NamedSharding):  # each device makes its own shard (several processes: only theirs)
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=place)()
    if not lazy:
        return jax.device_put(jnp.zeros(shape, dtype), place)
    return jax.device_put(jax.ffi.ffi_call("corejax_lazy_zeros", jax.ShapeDtypeStruct(shape, dtype))(), place)


def _ones(shape: tuple[int, ...], place: Any = None) -> jax.Array:
    if isinstance(place, NamedSharding):
        return jax.jit(lambda: jnp.ones(shape, jnp.float32), out_shardings=place)()
    return jax.device_put(jnp.ones(shape, jnp.float32), place or jax.local_devices()[0])


@struct.dataclass
class PagedKVCache:
    """KV pages shared by every sequence, read through a page table (vLLM's layout of concepts).

    k_pages, v_pages: [num_layers, num_kv_heads, num_pages, page_size, head_dim] float32/bfloat16/int8,
                      or uint8 [..., head_dim // 2] for packed int4 (kernels/kv_quant.py)
    k_scales, v_scales: [num_layers, num_kv_heads, num_pages, page_size] float32, or None for float pages
    page_table: [B, pages_per_seq] int32 — the pages of each row, padded with page 0
    lengths: [B] int32 — tokens of each row in the cache once this step's tokens are written

    Page 0 is the padding target: prompt padding and table padding write and point there, never into a
    page that holds a sequence's tokens. Which page holds what is decided on the host (corejax/serving/paging.py).
    """

    k_pages: jax.Array
    v_pages: jax.Array
    k_scales: jax.Array | None
    v_scales: jax.Array | None
    page_table: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, cfg: ModelConfig, num_pages: int, page_size: int, kv_dtype: str = "float32",
               sharding: Any = None, kernels: Kernels | None = None) -> PagedKVCache:
        """An empty pool; `sharding` (a NamedSharding of [L, K, P, page_size, H]) places it over several devices
        (corejax/engine/sharding.py), the scales with the same split. With the native kernels, its memory is
        committed only as pages are written."""
        lazy = kernels is not None and kernels.native
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"{kv_dtype=} must be one of {KV_DTYPES}")
        h = cfg.head_dim // 2 if kv_dtype == "int4" else cfg.head_dim
        shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, h)
        # bf16 pages are stored as their 16-bit patterns (uint16): XLA:CPU widens a bfloat16 cache to float32
        # around every write (convert, update, convert back: the whole cache, twice per layer per step; decode
        # crawled, docs/MEASUREMENTS.md); an integer array updates in place. The kernels read the bits as bfloat16.
        dtype = {"float32": jnp.float32, "bf16": jnp.uint16, "int8": jnp.int8, "int4": jnp.uint8}[kv_dtype]
        quantized = kv_dtype in QUANTIZED_KV
        scale_place = None if sharding is None else NamedSharding(sharding.mesh, P(*sharding.spec[:4]))
        return cls(k_pages=_zeros(shape, dtype, sharding, lazy), v_pages=_zeros(shape, dtype, sharding, lazy),
                   k_scales=_ones(shape[:-1], scale_place) if quantized else None,
                   v_scales=_ones(shape[:-1], scale_place) if quantized else None,
                   page_table=jnp.zeros((1, 1), jnp.int32), lengths=jnp.zeros((1,), jnp.int32))

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[3]

    @property
    def kv_dtype(self) -> str:
        return {jnp.dtype(jnp.int8): "int8", jnp.dtype(jnp.uint8): "int4",
                jnp.dtype(jnp.uint16): "bf16"}.get(jnp.dtype(self.k_pages.dtype), "float32")

    def with_rows(self, page_table: jax.Array, lengths: jax.Array) -> PagedKVCache:
        """The same pages, viewed through this step's page table [B, pages_per_seq] and lengths [B]."""
        return dataclasses.replace(self, page_table=page_table, lengths=lengths)

    def copy_page(self, src: int, dst: int) -> PagedKVCache:
        """Copy-on-write: duplicate page src into dst in every layer (host-issued, outside the jit sites)."""
        def cp(a):
            return None if a is None else a.at[:, :, dst].set(a[:, :, src])
        return dataclasses.replace(self, k_pages=cp(self.k_pages), v_pages=cp(self.v_pages),
                                   k_scales=cp(self.k_scales), v_scales=cp(self.v_scales))

    def attend(self, layer: jax.Array | int, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, *,
               window: jax.Array | int, scale: float, softcap: float) -> tuple[jax.Array, PagedKVCache]:
        """Writes k/v [B, T, K, H] at `positions` [B, T] through the page table, then paged attention.

        layer and window may be traced (a layer loop): the writes are scatters into the whole cache and the
        kernels read layer `layer` of it in place, so no layer's pages are ever copied out."""
        ps = self.page_size
        real = positions < self.lengths[:, None]  # padding tokens go to page 0
        index = jnp.clip(positions // ps, 0, self.page_table.shape[1] - 1)
        pages = jnp.where(real, jnp.take_along_axis(self.page_table, index, axis=1), 0)  # [B, T]
        offsets = jnp.where(real, positions % ps, 0)
        fmt = self.kv_dtype
        new = {}
        for name, x in (("k", k), ("v", v)):
            pages_arr = getattr(self, f"{name}_pages")
            if fmt in QUANTIZED_KV:
                values, scales = quantize_kv(x, fmt)  # [B, T, K, Hk], [B, T, K]
                new[f"{name}_scales"] = getattr(self, f"{name}_scales").at[layer, :, pages, offsets].set(
                    scales, mode="promise_in_bounds")
            elif fmt == "bf16":
                values = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
            else:
                values = x.astype(pages_arr.dtype)
            new[f"{name}_pages"] = pages_arr.at[layer, :, pages, offsets].set(values, mode="promise_in_bounds")
        cache = dataclasses.replace(self, **new)
        kernels = current()
        if kernels.native and paged_native.supported(q, cache.k_pages):  # float pages read in place, every core
            out = paged_native.paged_attention_native(q, cache.k_pages, cache.v_pages, layer, self.page_table,
                                                      self.lengths, positions, window=window, scale=scale,
                                                      softcap=softcap)
            return out, cache
        rows = q.shape[1] * (q.shape[2] // cache.k_pages.shape[1])  # query rows per KV head
        out = paged_attention(q, cache.k_pages, cache.v_pages, self.page_table, self.lengths, positions,
                              cache.k_scales, cache.v_scales, window=window, layer=layer, scale=scale,
                              softcap=softcap, impl=paged_impl(rows, kernels.pallas), interpret=kernels.interpret)
        return out, cache
