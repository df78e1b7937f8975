"""Paged attention for decode and chunked prefill: queries attend to KV pages through a page table.

Layout (one layer): k_pages, v_pages [K, P, page_size, H], kv head major as JAX's Pallas paged attention,
so the GPU kernel's BlockSpecs select one head's pool, a page of one head is one contiguous page_size·H run
and the per-head score einsum needs no transpose; it was faster than token-major [P, page_size, K, H] on a
CPU in most paired runs (docs/MEASUREMENTS.md).

Quantized pages (kernels/kv_quant.py): int8 [K, P, page_size, H] or packed int4 uint8 [K, P, page_size, H // 2], with f32 scales [K, P, page_size] (one per token and kv head),
dequantized per tile inside the loop: scores are (q·k_int)·k_scale, values (p·v_scale)·v_int.

Token s of sequence b (its absolute position is s, as in DenseKVCache) lives in page page_table[b, s //
page_size] at offset s % page_size. lengths[b] counts the tokens in the cache including the ones being
queried (they are written before attending). Table entries past a sequence's length are never visited
beyond the last tile and are masked there; the host points them at page 0, the reserved padding page.

Implementations, picked by `impl` (default: Pallas on GPU, lax elsewhere):
- "lax": a fori_loop over tiles of pages_per_block pages, bounded by the longest length and (with a
  window) the earliest visible position across the batch; online softmax; no [T, S] scores.
- "pallas": one program per (sequence, kv head) with all G·T query rows of that head in one block.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from corejax.kernels.flash_attention import (
    MASKED,
    cap_scores,
    default_impl,
    flash_attention_reference,
    in_window,
    online_softmax_finish,
    online_softmax_init,
    triton_params,
)
from corejax.kernels.kv_quant import dequantize_kv, kv_format, unpack_int4
from jax import lax
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_kv: tokens per key tile, rounded down to whole pages (at least one page).

    1024 tokens (64 pages of 16) beat 64 and 256 for the lax path at 2k and 8k context here;
    for the Pallas GPU kernel 8 pages per tile as in JAX's kernel is the usual start."""

    block_kv: int = 1024

    def pages_per_block(self, page_size: int, pages_per_seq: int) -> int:
        return max(1, min(self.block_kv // page_size, pages_per_seq))


def _tiles(page_table, page_size, block_kv):
    """-> (pages per tile, number of tiles, the page table padded with page 0 to whole tiles)."""
    ppb = BlockSizes(block_kv).pages_per_block(page_size, page_table.shape[1])
    nblk = pl.cdiv(page_table.shape[1], ppb)
    return ppb, nblk, jnp.pad(page_table, ((0, 0), (0, nblk * ppb - page_table.shape[1])))


def _band(lengths, q_positions, window, page_size, ppb):
    """-> (lo, hi) [B]: tiles of ppb pages that hold keys some query of the row can see."""
    tile = ppb * page_size
    hi_tok = jnp.minimum(lengths, q_positions.max(-1) + 1)
    lo_tok = jnp.where(window > 0, jnp.maximum(q_positions.min(-1) - window + 1, 0), 0)
    return (lo_tok // tile).astype(jnp.int32), pl.cdiv(jnp.maximum(hi_tok, 0), tile).astype(jnp.int32)


def _scores(qs, kt, fmt, spec):
    """q·k for one tile with k dequantized on the fly: qs [..., H] f32 already scaled."""
    if fmt == "int4":
        lo, hi = unpack_int4(kt)
        half = qs.shape[-1] // 2
        s = jnp.einsum(spec, qs[..., :half], lo.astype(jnp.float32))
        s += jnp.einsum(spec, qs[..., half:], hi.astype(jnp.float32))
    else:
        s = jnp.einsum(spec, qs, kt.astype(jnp.float32))
    return s


def _bits_as_bf16(x):
    """bfloat16 pages may come as their uint16 bit patterns (corejax/engine/cache.py stores them so): viewed back after
    the gather, so XLA never converts (or copies) the whole cache."""
    return lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def _take(pages, layer, ids):
    """pages[:, ids] -> [K, *ids.shape, ...] of one layer's [K, P, ...] array, or of layer `layer` of the stacked
    [L, K, P, ...] one: one gather from the whole array, never a copy of the layer. (NumPy's rule puts the
    broadcast index dims of pages[layer, :, ids] first; the move restores [K, ...] on the small tile.)"""
    return _bits_as_bf16(pages[:, ids] if layer is None else jnp.moveaxis(pages[layer, :, ids], ids.ndim, 0))


def _values(p, vt, fmt, spec):
    """p·v for one tile (p already multiplied by v's scales when quantized)."""
    if fmt == "int4":
        lo, hi = unpack_int4(vt)
        return jnp.concatenate(
            [jnp.einsum(spec, p, lo.astype(jnp.float32)), jnp.einsum(spec, p, hi.astype(jnp.float32))], axis=-1
        )
    return jnp.einsum(spec, p, vt.astype(jnp.float32))


def _paged_lax(
    q, k_pages, v_pages, k_scales, v_scales, page_table, lengths, q_positions, *, window, scale, softcap, block_kv,
    layer=None
):
    b, t, n, h = q.shape
    kv_heads, _, page, _ = k_pages.shape[-4:]
    g = n // kv_heads
    fmt = kv_format(k_pages)
    ppb, nblk, table = _tiles(page_table, page, block_kv)  # pad -> page 0
    bk = ppb * page
    lo, hi = _band(lengths, q_positions, window, page, ppb)
    qs = q.reshape(b, t, kv_heads, g, h).astype(jnp.float32) * scale
    qp = q_positions[:, None, None, :, None]  # [B, 1, 1, T, 1]
    length = lengths[:, None, None, None, None]

    def tile(j, carry):
        acc, m, l = carry
        ids = lax.dynamic_slice_in_dim(table, j * ppb, ppb, 1)  # [B, ppb]
        kt = _take(k_pages, layer, ids).reshape(kv_heads, b, bk, -1)  # [K, B, bk, H or H/2]
        vt = _take(v_pages, layer, ids).reshape(kv_heads, b, bk, -1)
        sc = _scores(qs, kt, fmt, "BTKGH,KBSH->BKGTS")  # [B, K, G, T, bk]
        if fmt != "float":
            sc *= jnp.transpose(_take(k_scales, layer, ids).reshape(kv_heads, b, bk), (1, 0, 2))[:, :, None, None, :]
        sc = cap_scores(sc, softcap)
        kpos = (j * bk + jnp.arange(bk))[None, None, None, None, :]
        vis = in_window((kpos < length) & (kpos <= qp), qp, kpos, window)
        sc = jnp.where(vis, sc, MASKED)
        m_new = jnp.maximum(m, sc.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(vis, jnp.exp(sc - m_new[..., None]), 0.0)
        l = l * corr + p.sum(-1)
        if fmt != "float":
            p = p * jnp.transpose(_take(v_scales, layer, ids).reshape(kv_heads, b, bk), (1, 0, 2))[:, :, None, None, :]
        acc = acc * corr[..., None] + _values(p, vt, fmt, "BKGTS,KBSH->BKGTH")
        return acc, m_new, l

    init = (
        jnp.zeros((b, kv_heads, g, t, h), jnp.float32),
        jnp.full((b, kv_heads, g, t), MASKED, jnp.float32),
        jnp.zeros((b, kv_heads, g, t), jnp.float32),
    )
    acc, _, l = lax.fori_loop(lo.min(), hi.max(), tile, init)
    o = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, t, n, h).astype(q.dtype)


def _paged_kernel(
    band_ref,  # [4]: lo tile, hi tile, length, window (0 = none)
    q_ref,  # [R, H] rows (t, g) of one kv head, R padded
    qpos_ref,  # [R]; -1 on padding rows
    table_ref,  # [pages_per_seq padded to whole tiles]
    k_ref,  # [P, page_size, Hk]
    v_ref,  # [P, page_size, Hk]
    *rest,  # (k_scales_ref, v_scales_ref [P, page_size]) when quantized, then o_ref [R, H]
    fmt: str,
    scale: float,
    softcap: float,
    ppb: int,
):
    if fmt == "float":
        (o_ref,) = rest
    else:
        ks_ref, vs_ref, o_ref = rest
    q = q_ref[...].astype(jnp.float32) * scale
    qp = qpos_ref[...][:, None]
    rows, h = q.shape
    page = k_ref.shape[1]
    bk = ppb * page
    length = band_ref[2]
    window = band_ref[3]

    def body(j, carry):
        acc, m, l = carry
        ids = table_ref[pl.ds(j * ppb, ppb)]
        kt = k_ref[ids].reshape(bk, k_ref.shape[2])
        vt = v_ref[ids].reshape(bk, v_ref.shape[2])
        sc = _scores(q, kt, fmt, "RH,SH->RS")
        if fmt != "float":
            sc *= ks_ref[ids].reshape(1, bk)
        sc = cap_scores(sc, softcap)
        kpos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        vis = in_window((kpos < length) & (kpos <= qp), qp, kpos, window)
        sc = jnp.where(vis, sc, MASKED)
        m_new = jnp.maximum(m, sc.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(vis, jnp.exp(sc - m_new[:, None]), 0.0)
        l = l * corr + p.sum(-1)
        if fmt != "float":
            p = p * vs_ref[ids].reshape(1, bk)
        acc = acc * corr[:, None] + _values(p, vt, fmt, "RS,SH->RH")
        return acc, m_new, l

    acc, _, l = lax.fori_loop(band_ref[0], band_ref[1], body, online_softmax_init(rows, h))
    o_ref[...] = online_softmax_finish(acc, l).astype(o_ref.dtype)


def _paged_pallas(
    q,
    k_pages,
    v_pages,
    k_scales,
    v_scales,
    page_table,
    lengths,
    q_positions,
    *,
    window,
    scale,
    softcap,
    block_kv,
    interpret,
    layer=None,
):
    if layer is not None:
        # The GPU kernel's BlockSpecs select one kv head's pool of one layer; a stacked cache is sliced first.
        k_pages, v_pages = k_pages[layer], v_pages[layer]
        k_scales = None if k_scales is None else k_scales[layer]
        v_scales = None if v_scales is None else v_scales[layer]
    k_pages, v_pages = _bits_as_bf16(k_pages), _bits_as_bf16(v_pages)
    b, t, n, h = q.shape
    kv_heads, num_pages, page, hk = k_pages.shape
    g = n // kv_heads
    fmt = kv_format(k_pages)
    ppb, nblk, table = _tiles(page_table, page, block_kv)
    lo, hi = _band(lengths, q_positions, window, page, ppb)
    band = jnp.stack([lo, hi, lengths.astype(jnp.int32), jnp.broadcast_to(jnp.asarray(window, jnp.int32), lo.shape)],
                     axis=-1)  # [B, 4]
    # Rows r = t·G + g of kv head k, padded to >= 16 (the smallest tile Triton's dot takes).
    rows = t * g
    rp = max(16, pl.next_power_of_2(rows))
    qr = jnp.transpose(q.reshape(b, t, kv_heads, g, h), (0, 2, 1, 3, 4)).reshape(b, kv_heads, rows, h)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rp - rows), (0, 0)))
    qpos = jnp.pad(jnp.repeat(q_positions, g, axis=1), ((0, 0), (0, rp - rows)), constant_values=-1)
    pages_spec = pl.BlockSpec((None, num_pages, page, hk), lambda bi, ki: (ki, 0, 0, 0))
    in_specs = [
        pl.BlockSpec((None, 4), lambda bi, ki: (bi, 0)),
        pl.BlockSpec((None, None, rp, h), lambda bi, ki: (bi, ki, 0, 0)),
        pl.BlockSpec((None, rp), lambda bi, ki: (bi, 0)),
        pl.BlockSpec((None, table.shape[1]), lambda bi, ki: (bi, 0)),
        pages_spec,
        pages_spec,
    ]
    args = [band, qr, qpos, table, k_pages, v_pages]
    if fmt != "float":
        scales_spec = pl.BlockSpec((None, num_pages, page), lambda bi, ki: (ki, 0, 0))
        in_specs += [scales_spec, scales_spec]
        args += [k_scales, v_scales]
    kernel = functools.partial(_paged_kernel, fmt=fmt, scale=scale, softcap=softcap, ppb=ppb)
    out = pl.pallas_call(
        kernel,
        grid=(b, kv_heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, rp, h), lambda bi, ki: (bi, ki, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kv_heads, rp, h), q.dtype),
        interpret=interpret,
        compiler_params=triton_params(interpret),
        name=f"paged_attention_{fmt}",
    )(*args)
    out = out[:, :, :rows].reshape(b, kv_heads, t, g, h)
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(b, t, n, h)


# The Pallas kernel holds all G·T query rows of a KV head in one program. On an H200 (Triton; benchmarks/gpu.py,
# docs/MEASUREMENTS.md) with 128-token key tiles decode (T = 1) and a 16-token chunk (64 rows) compile and beat
# lax; 1024-token tiles exceed the 227 KiB of shared memory, and a 512-token prefill chunk (2048 rows) exceeds
# Triton's 2^20-element tensor limit. So on a GPU: Pallas with 128-token tiles up to 64 rows (decode, speculative
# verification), lax for prefill chunks (there XLA's fused dots run at HF's prefill speed).
GPU_BLOCK_KV = 128
PALLAS_MAX_ROWS = 64


def paged_impl(rows: int, pallas: bool) -> str:
    """The implementation for `rows` = T·G query rows per KV head: Pallas where the policy runs Pallas and the
    rows fit its tiles, lax above (prefill chunks) and on CPUs."""
    return "pallas" if pallas and rows <= PALLAS_MAX_ROWS else "lax"


def default_paged_impl(rows: int) -> str:
    """paged_attention's choice when the caller names none: by this process's default backend (standalone
    calls; corejax's programs pass the kernel policy's, corejax/engine/cache.py)."""
    return paged_impl(rows, default_impl() == "pallas")


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "block_sizes", "impl", "interpret"))
def _paged_attention(
    q: jax.Array,  # [B, T, N, H]
    k_pages: jax.Array,  # [K, P, page_size, H] float (bf16 also as uint16 bits) | int8, or [..., H // 2] uint8 (int4)
    v_pages: jax.Array,  # same as k_pages
    page_table: jax.Array,  # [B, pages_per_seq] int32; unused entries -> page 0 (holds finite values)
    lengths: jax.Array,  # [B] int32 tokens in the cache, including the queried ones
    q_positions: jax.Array,  # [B, T] int32 absolute positions of the queries
    k_scales: jax.Array | None = None,  # [K, P, page_size] f32, required for int8/int4 pages
    v_scales: jax.Array | None = None,  # [K, P, page_size] f32
    *,
    window: int | jax.Array = 0,
    layer: int | jax.Array | None = None,
    scale: float | None = None,
    softcap: float = 0.0,
    block_sizes: BlockSizes | None = None,
    impl: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal GQA attention of q against the paged cache -> [B, T, N, H] in q's dtype (f32 math).

    A cached token at index s of row b is visible to a query at position p iff s < lengths[b], s <= p and
    (window == 0 or p - s < window); soft-cap as in flash_attention. T = 1 is decode; T > 1 is a prefill
    chunk whose keys were written first. A query that sees nothing returns zeros.

    Quantized KV, relative L2 norm of the output error vs f32 pages (random normal q/k/v, head_dim
    64-256, 61-2048 tokens, windows 0-128; per-(token, head) absmax scales): the tests assert int8 < 1.5% and
    int4 < 20% (the observed errors: docs/MEASUREMENTS.md). Normal data is the hard case for absmax int4 (step ≈
    0.4σ); measure a real model's logits before choosing int4. Recompiles per shape, KV format and static argument.

    With `layer` (an int32, traced in a layer loop), k_pages/v_pages (and scales) are the whole cache [L, K, P,
    page_size, H] and layer `layer` is read in place. `window` may be traced too (a layer loop's per-layer value)."""
    b, t, n, h = q.shape
    fmt = kv_format(k_pages)
    ndim = 4 if layer is None else 5
    if k_pages.ndim != ndim or k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages must be equal [(L,) K, P, page_size, H] (L with a layer): "
                         f"{k_pages.shape=} {v_pages.shape=} {layer=}")
    kv_heads, num_pages, page, hk = k_pages.shape[-4:]
    if hk != (h // 2 if fmt == "int4" else h):
        raise ValueError(f"head_dim of pages ({fmt}) does not match q: {q.shape=} {k_pages.shape=}")
    if n % kv_heads:
        raise ValueError(f"query heads must be a multiple of kv heads: {q.shape=} {k_pages.shape=}")
    if page_table.ndim != 2 or page_table.shape[0] != b or page_table.dtype != jnp.int32:
        raise ValueError(
            f"page_table must be int32 [B, pages_per_seq]: {page_table.shape=} {page_table.dtype=} {q.shape=}"
        )
    if lengths.shape != (b,) or q_positions.shape != (b, t):
        raise ValueError(
            f"lengths must be [B] and q_positions [B, T]: {lengths.shape=} {q_positions.shape=} {q.shape=}"
        )
    if fmt == "float" and (k_scales is not None or v_scales is not None):
        raise ValueError(f"scales given for float pages: {k_pages.dtype=}")
    if fmt != "float" and (
        k_scales is None
        or v_scales is None
        or k_scales.shape != k_pages.shape[:-1]
        or v_scales.shape != k_scales.shape
    ):
        raise ValueError(
            f"{fmt} pages need k_scales and v_scales [K, P, page_size]: {k_pages.shape=} "
            f"{None if k_scales is None else k_scales.shape=} {None if v_scales is None else v_scales.shape=}"
        )
    if softcap < 0:
        raise ValueError(f"{softcap=} must be >= 0")
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    impl = impl or default_paged_impl(t * (n // kv_heads))
    block_kv = block_sizes.block_kv if block_sizes else GPU_BLOCK_KV if impl == "pallas" else BlockSizes().block_kv
    args = (q, k_pages, v_pages, k_scales, v_scales, page_table, lengths, q_positions)
    kw = {"window": window, "scale": scale, "softcap": softcap}
    if impl == "reference":
        if layer is not None:
            args = (q, k_pages[layer], v_pages[layer], None if k_scales is None else k_scales[layer],
                    None if v_scales is None else v_scales[layer], page_table, lengths, q_positions)
        return paged_attention_reference(*args, **kw).astype(q.dtype)
    if impl == "lax":
        return _paged_lax(*args, block_kv=block_kv, layer=layer, **kw)
    if impl == "pallas":
        return _paged_pallas(*args, block_kv=block_kv, interpret=interpret, layer=layer, **kw)
    raise ValueError(f"{impl=} must be 'lax', 'pallas', 'reference' or None")


@functools.wraps(_paged_attention)
def paged_attention(*args, window: int | jax.Array = 0, **kwargs) -> jax.Array:
    if isinstance(window, int) and window < 0:  # checked here: inside the jit, window is always traced
        raise ValueError(f"{window=} must be >= 0")
    return _paged_attention(*args, window=window, **kwargs)


def gather_pages(pages: jax.Array, scales: jax.Array | None, page_table: jax.Array) -> jax.Array:
    """[K, P, page_size, Hk] pages -> dense f32 [B, pages_per_seq · page_size, K, H] (dequantized)."""
    kv_heads, _, page, _ = pages.shape
    b, pps = page_table.shape
    x = _bits_as_bf16(pages[:, page_table])  # [K, B, pps, page, Hk]
    if kv_format(pages) == "float":
        x = x.astype(jnp.float32)
    else:
        x = dequantize_kv(x, scales[:, page_table])
    return jnp.transpose(x.reshape(kv_heads, b, pps * page, -1), (1, 2, 0, 3))


def paged_attention_reference(
    q, k_pages, v_pages, k_scales, v_scales, page_table, lengths, q_positions, *, window=0, scale=None, softcap=0.0
) -> jax.Array:
    """Gathers every page of every row into dense [B, S, K, H] f32 and applies the dense math (f32 result)."""
    k = gather_pages(k_pages, k_scales, page_table)
    v = gather_pages(v_pages, v_scales, page_table)
    s = k.shape[1]
    idx = jnp.arange(s)[None, :]
    k_positions = jnp.where(idx < lengths[:, None], idx, -1).astype(jnp.int32)
    return flash_attention_reference(q, k, v, q_positions, k_positions, window=window, scale=scale, softcap=softcap)
