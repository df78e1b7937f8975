"""Tiled flash attention for prefill: causal by absolute position, sliding window, GQA, logit soft-cap.

Online softmax over key tiles (FlashAttention, Dao et al. 2022; the rescaled accumulator of
FlashAttention-2, arXiv:2307.08691 §3.1) so no [T, S] score matrix ever exists: memory is
O(block_q · block_k) per (batch, head) on top of q, k, v and the output.

Two implementations of the same math, picked by `impl` (default: Pallas on GPU, lax elsewhere):
- "lax": a fori_loop over query tiles with an inner fori_loop over only the key tiles that intersect the
  causal/window band of that query tile (dynamic bounds, computed from the positions), so causal prefill
  does about half the work of the dense reference and a sliding window makes it linear in T.
- "pallas": one program per (batch, query head, query tile), looping over the same band of key tiles.
  On CPU run it with interpret=True (the tests do).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MASKED = -1e30  # finite, so a row with nothing visible yet never computes inf - inf
_FAR = 2**30  # a position no real token has; marks empty tiles in the band computation


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query and key tile lengths (tokens). Tiles larger than T or S shrink to them.

    CPU default: 128x128 was the fastest of the square tiles measured for a 2k prefill (benchmarks/attention.py)
    and held the fewest XLA temporaries; 256 and 512 were slower and bigger (docs/MEASUREMENTS.md).
    For the Pallas GPU kernel powers of two of 64-128 are the usual choice."""

    block_q: int = 128
    block_k: int = 128


# On an H200 (Triton) 128x128 tiles at head_dim 128 exceed the shared memory; 64x64 compile and run, several
# times faster than lax (docs/MEASUREMENTS.md).
GPU_BLOCK_SIZES = BlockSizes(64, 64)


def _visible(qp: jax.Array, kp: jax.Array, window: int, causal: bool = True) -> jax.Array:
    """Key visible to query: 0 <= k_pos <= q_pos and, with a window, q_pos - k_pos < window.
    Non-causal (encoders): every key with k_pos >= 0, whatever the query."""
    if not causal:
        return jnp.broadcast_to(kp >= 0, jnp.broadcast_shapes(qp.shape, kp.shape))
    return in_window((kp <= qp) & (kp >= 0), qp, kp, window)


def in_window(vis: jax.Array, qp: jax.Array, kp: jax.Array, window: jax.Array | int) -> jax.Array:
    """vis narrowed to keys inside the sliding window (0 = none). A Python int adds nothing when 0; a traced
    window (a layer loop's per-layer value) is applied at run time."""
    if isinstance(window, int):
        return vis & (qp - kp < window) if window else vis
    return vis & ((window <= 0) | (qp - kp < window))


def online_softmax_init(rows: int, h: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The online-softmax state before the first key tile: accumulator [rows, h], running max [rows],
    running sum [rows] (FlashAttention, Dao et al. 2022)."""
    return (jnp.zeros((rows, h), jnp.float32), jnp.full((rows,), MASKED, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def online_softmax_finish(acc: jax.Array, l: jax.Array) -> jax.Array:
    """acc [rows, h] / running sum [rows]; a row that saw no key (sum 0) stays zero."""
    return acc / jnp.where(l > 0, l, 1.0)[:, None]


def cap_scores(s: jax.Array, softcap: float) -> jax.Array:
    return jnp.tanh(s / softcap) * softcap if softcap else s


def _key_tile_band(
    q_positions: jax.Array,  # [B, T]
    k_positions: jax.Array,  # [B, S]
    q_starts: jax.Array,  # [num_q_tiles] first row of each query tile
    block_q: int,
    block_k: int,
    window: int,
    causal: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """-> (lo, hi) [B, num_q_tiles]: the key tiles [lo, hi) holding every key a query tile can see.

    Key tile j covers key indices [j·block_k, (j+1)·block_k) ∩ [0, S). Exact for any positions; with
    monotone positions (the usual case) no tile inside [lo, hi) is empty of visible keys."""
    b, s = k_positions.shape
    nk = pl.cdiv(s, block_k)
    kp = jnp.pad(k_positions, ((0, 0), (0, nk * block_k - s)), constant_values=-1).reshape(b, nk, block_k)
    valid = kp >= 0
    kmin = jnp.where(valid, kp, _FAR).min(-1)  # [B, nk]
    kmax = jnp.where(valid, kp, -_FAR).max(-1)
    qp = q_positions[:, q_starts[:, None] + jnp.arange(block_q)]  # [B, nq, block_q]
    qmin, qmax = qp.min(-1), qp.max(-1)  # [B, nq]
    needed = kmin[:, None, :] <= qmax[:, :, None]  # [B, nq, nk]
    if not causal:
        needed = jnp.broadcast_to((kmin < _FAR)[:, None, :], needed.shape)
    elif window:
        needed &= qmin[:, :, None] - kmax[:, None, :] < window
    anyn = needed.any(-1)
    lo = jnp.where(anyn, jnp.argmax(needed, axis=-1), nk)  # empty band: lo = nk > hi = 0
    hi = jnp.where(anyn, nk - jnp.argmax(needed[..., ::-1], axis=-1), 0)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _flash_lax(q, k, v, q_positions, k_positions, *, window, scale, softcap, block_q, block_k, causal=True):
    """The CPU path: loops over tiles; tiles that overhang T or S are shifted back inside (clamped start)
    and the rows/keys already covered by the previous tile are ignored, so nothing is padded or copied."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    bq, bk = min(block_q, t), min(block_k, s)
    nq = pl.cdiv(t, bq)
    # One query tile and one key tile (an encoder's sentence, a short prompt): no loops — XLA:CPU runs a
    # while loop's body unfused, per iteration, and the band computation would cost as much as the tile.
    single = nq == 1 and bk == s
    q_starts = jnp.minimum(jnp.arange(nq) * bq, t - bq)
    if not single:
        lo, hi = _key_tile_band(q_positions, k_positions, q_starts, bq, bk, window, causal)
        lo, hi = lo.min(0), hi.max(0)  # [nq]: one band for the whole batch keeps the loop shapes static

    def q_tile(i, out):
        qs = q_starts[i]
        qt = lax.dynamic_slice_in_dim(q, qs, bq, 1).astype(jnp.float32) * scale  # [B, bq, N, H]
        qt = qt.reshape(b, bq, kv_heads, g, h)
        qpt = lax.dynamic_slice_in_dim(q_positions, qs, bq, 1)[:, None, None, :, None]  # [B, 1, 1, bq, 1]

        def k_tile(j, carry):
            acc, m, l = carry
            ks = jnp.minimum(j * bk, s - bk)
            kt = lax.dynamic_slice_in_dim(k, ks, bk, 1).astype(jnp.float32)  # [B, bk, K, H]
            vt = lax.dynamic_slice_in_dim(v, ks, bk, 1).astype(jnp.float32)
            kpt = lax.dynamic_slice_in_dim(k_positions, ks, bk, 1)[:, None, None, None, :]  # [B,1,1,1,bk]
            fresh = (ks + jnp.arange(bk) >= j * bk)[None, None, None, None, :]
            sc = cap_scores(jnp.einsum("BTKGH,BSKH->BKGTS", qt, kt), softcap)  # [B, K, G, bq, bk]
            vis = _visible(qpt, kpt, window, causal) & fresh
            sc = jnp.where(vis, sc, MASKED)
            m_new = jnp.maximum(m, sc.max(-1))
            corr = jnp.exp(m - m_new)
            p = jnp.where(vis, jnp.exp(sc - m_new[..., None]), 0.0)
            acc = acc * corr[..., None] + jnp.einsum("BKGTS,BSKH->BKGTH", p, vt)
            return acc, m_new, l * corr + p.sum(-1)

        init = (
            jnp.zeros((b, kv_heads, g, bq, h), jnp.float32),
            jnp.full((b, kv_heads, g, bq), MASKED, jnp.float32),
            jnp.zeros((b, kv_heads, g, bq), jnp.float32),
        )
        acc, _, l = k_tile(0, init) if single else lax.fori_loop(lo[i], hi[i], k_tile, init)
        o = acc / jnp.where(l > 0, l, 1.0)[..., None]  # a row that sees nothing gives 0, not NaN
        o = jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, bq, n, h).astype(out.dtype)
        return lax.dynamic_update_slice_in_dim(out, o, qs, 1)

    if single:
        return q_tile(0, jnp.zeros(q.shape, q.dtype))
    return lax.fori_loop(0, nq, q_tile, jnp.zeros(q.shape, q.dtype))


def triton_params(interpret: bool) -> pltriton.CompilerParams | None:
    """The Pallas GPU backend these kernels are written for: Triton (gathered page loads, [rows, tile] dots on
    register tiles). JAX's default GPU backend is Mosaic GPU (jax_pallas_use_mosaic_gpu), which lowers none of
    them ("Only copies transferring a number of bytes divisible by the warpgroup size"), so ask for Triton."""
    return None if interpret else pltriton.CompilerParams()


def _flash_kernel(
    band_ref,  # [2]: key tiles [lo, hi) this query tile must visit
    q_ref,  # [block_q, H]
    qpos_ref,  # [block_q]
    k_ref,  # [S_pad, H]
    v_ref,  # [S_pad, H]
    kpos_ref,  # [S_pad]; -1 on padding
    o_ref,  # [block_q, H]
    *,
    scale: float,
    softcap: float,
    window: int,
    block_k: int,
    causal: bool,
):
    q = q_ref[...].astype(jnp.float32) * scale
    qp = qpos_ref[...][:, None]
    block_q, h = q.shape

    def body(j, carry):
        acc, m, l = carry
        sl = pl.ds(j * block_k, block_k)
        k = k_ref[sl, :].astype(jnp.float32)
        v = v_ref[sl, :].astype(jnp.float32)
        kp = kpos_ref[sl][None, :]
        sc = cap_scores(lax.dot_general(q, k, (((1,), (1,)), ((), ()))), softcap)  # [block_q, block_k]
        vis = _visible(qp, kp, window, causal)
        sc = jnp.where(vis, sc, MASKED)
        m_new = jnp.maximum(m, sc.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(vis, jnp.exp(sc - m_new[:, None]), 0.0)
        acc = acc * corr[:, None] + jnp.dot(p, v)
        return acc, m_new, l * corr + p.sum(-1)

    acc, _, l = lax.fori_loop(band_ref[0], band_ref[1], body, online_softmax_init(block_q, h))
    o_ref[...] = online_softmax_finish(acc, l).astype(o_ref.dtype)


def _flash_pallas(q, k, v, q_positions, k_positions, *, window, scale, softcap, block_q, block_k, interpret,
                  causal=True):
    """Pads T and S up to whole tiles (padding keys get position -1, padding query rows are dropped)."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    bq, bk = min(block_q, t), min(block_k, s)
    nq, nk = pl.cdiv(t, bq), pl.cdiv(s, bk)
    tp, sp = nq * bq, nk * bk
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    q_positions = jnp.pad(q_positions, ((0, 0), (0, tp - t)), mode="edge")
    k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    k_positions = jnp.pad(k_positions, ((0, 0), (0, sp - s)), constant_values=-1)
    lo, hi = _key_tile_band(q_positions, k_positions, jnp.arange(nq) * bq, bq, bk, window, causal)
    band = jnp.stack([lo, hi], axis=-1)  # [B, nq, 2]
    kernel = functools.partial(_flash_kernel, scale=scale, softcap=softcap, window=window, block_k=bk,
                               causal=causal)
    out = pl.pallas_call(
        kernel,
        grid=(b, n, nq),
        in_specs=[
            pl.BlockSpec((None, None, 2), lambda bi, ni, qi: (bi, qi, 0)),
            pl.BlockSpec((None, bq, None, h), lambda bi, ni, qi: (bi, qi, ni, 0)),
            pl.BlockSpec((None, bq), lambda bi, ni, qi: (bi, qi)),
            pl.BlockSpec((None, sp, None, h), lambda bi, ni, qi: (bi, 0, ni // g, 0)),
            pl.BlockSpec((None, sp, None, h), lambda bi, ni, qi: (bi, 0, ni // g, 0)),
            pl.BlockSpec((None, sp), lambda bi, ni, qi: (bi, 0)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, h), lambda bi, ni, qi: (bi, qi, ni, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        compiler_params=triton_params(interpret),
        name="flash_attention",
    )(band, q, q_positions, k, v, k_positions)
    return out[:, :t]


def default_impl() -> str:
    """'pallas' where the default device is a GPU, 'lax' elsewhere (XLA compiles the loops well on CPU)."""
    return "pallas" if jax.default_backend() == "gpu" else "lax"


@functools.partial(jax.jit, static_argnames=("window", "scale", "softcap", "block_sizes", "impl", "interpret",
                                             "causal"))
def flash_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    q_positions: jax.Array,  # [B, T] int32 absolute positions of the queries
    k_positions: jax.Array,  # [B, S] int32 positions of the keys; < 0 marks an empty slot (never visible)
    *,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
    block_sizes: BlockSizes | None = None,
    impl: str | None = None,
    interpret: bool = False,
    causal: bool = True,
) -> jax.Array:
    """Causal GQA attention -> [B, T, N, H] in q's dtype, scores and accumulation in f32.

    A key is visible to a query iff 0 <= k_pos <= q_pos and (window == 0 or q_pos - k_pos < window);
    scores are scale·q·k, soft-capped as tanh(s / softcap)·softcap when softcap > 0. A query row that sees
    no key returns zeros. For a prompt of length L padded to S, pass k_positions = arange(S) with -1 past L
    (or the absolute positions of a chunk). causal=False (encoders) makes every key with k_pos >= 0
    visible to every query (window must be 0), so padding is masked by k_pos = -1 alone. `impl`: "lax" | "pallas" | "reference" | None (automatic).
    Recompiles per shape and per static argument."""
    b, t, n, h = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"k and v must be [B, S, K, H] matching q [B, T, N, H]: {q.shape=} {k.shape=} {v.shape=}")
    if n % k.shape[2]:
        raise ValueError(f"query heads must be a multiple of kv heads: {q.shape=} {k.shape=}")
    if q_positions.shape != (b, t) or k_positions.shape != (b, k.shape[1]):
        raise ValueError(
            f"positions must be [B, T] and [B, S]: {q_positions.shape=} {k_positions.shape=} {q.shape=} {k.shape=}"
        )
    if window < 0 or softcap < 0:
        raise ValueError(f"{window=} and {softcap=} must be >= 0")
    if window and not causal:
        raise ValueError(f"a sliding {window=} needs causal=True")
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    impl = impl or default_impl()
    bs = block_sizes or (GPU_BLOCK_SIZES if impl == "pallas" and h > 64 else BlockSizes())
    kw = {"window": window, "scale": scale, "softcap": softcap, "causal": causal}
    if impl == "reference":
        return flash_attention_reference(q, k, v, q_positions, k_positions, **kw).astype(q.dtype)
    if impl == "lax":
        return _flash_lax(q, k, v, q_positions, k_positions, block_q=bs.block_q, block_k=bs.block_k, **kw)
    if impl == "pallas":
        return _flash_pallas(
            q, k, v, q_positions, k_positions, block_q=bs.block_q, block_k=bs.block_k, interpret=interpret, **kw
        )
    raise ValueError(f"{impl=} must be 'lax', 'pallas', 'reference' or None")


def flash_attention_reference(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    q_positions: jax.Array,  # [B, T]
    k_positions: jax.Array,  # [B, S]
    *,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
    causal: bool = True,
) -> jax.Array:
    """The same math with an explicit [T, S] score matrix (f32 result); rows that see nothing give 0."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h).astype(jnp.float32)
    sc = cap_scores(jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32)) * scale, softcap)
    vis = _visible(q_positions[:, None, None, :, None], k_positions[:, None, None, None, :], window, causal)
    sc = jnp.where(vis, sc, MASKED)
    p = jnp.where(vis, jax.nn.softmax(sc, axis=-1), 0.0)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p, v.astype(jnp.float32))
    return out.reshape(b, t, n, h)
