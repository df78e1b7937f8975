"""Paged attention (lax and Pallas-interpret paths) against its reference and the dense cache math."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from corejax.kernels.kv_quant import dequantize_kv, quantize_kv
from corejax.kernels.paged_attention import (
    BlockSizes,
    paged_attention,
    paged_attention_reference,
)

from corejax.kernels.flash_attention import flash_attention_reference as dense_attention

INT8_TOL, INT4_TOL = 0.015, 0.20  # relative L2 norm of the output error, as stated in paged_attention


def _paged(k: np.ndarray, v: np.ndarray, lengths, page_size: int, rng, spare: int = 3):
    """Dense k, v [B, S, K, H] -> (k_pages, v_pages [K, P, page, H], page_table [B, pps]) on shuffled pages.

    Page 0 and every slot past a row's length hold large finite garbage: the kernels must mask them."""
    b, s, kv_heads, h = k.shape
    pps = -(-s // page_size) + 1  # one table entry more than needed, pointing at page 0
    need = [-(-int(n) // page_size) for n in lengths]
    num_pages = 1 + sum(need) + spare
    ids = iter(rng.permutation(np.arange(1, num_pages)))
    pages = [rng.uniform(-50, 50, (kv_heads, num_pages, page_size, h)).astype(np.float32) for _ in "kv"]
    table = np.zeros((b, pps), np.int32)
    for row, n in enumerate(lengths):
        for i in range(need[row]):
            table[row, i] = page = next(ids)
            for dense, pool in zip((k, v), pages):
                chunk = dense[row, i * page_size : min((i + 1) * page_size, n)]  # [<=page, K, H]
                pool[:, page, : len(chunk)] = np.transpose(chunk, (1, 0, 2))
    return pages[0], pages[1], table


def _case(rng, *, b, t, n, kv_heads, h, page_size, lengths):
    s = max(lengths)
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k = rng.standard_normal((b, s, kv_heads, h)).astype(np.float32)
    v = rng.standard_normal((b, s, kv_heads, h)).astype(np.float32)
    k_pages, v_pages, table = _paged(k, v, lengths, page_size, rng)
    lengths = np.asarray(lengths, np.int32)
    q_positions = (lengths[:, None] - t + np.arange(t)[None, :]).astype(np.int32)  # the last t tokens
    return q, k, v, k_pages, v_pages, table, lengths, q_positions


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("impl", ["lax", "pallas"])
@pytest.mark.parametrize(
    "page_size, ratio, h, lengths, t, window, softcap, block_kv",
    [
        (8, 1, 64, (5, 37), 1, 0, 0.0, 16),  # decode, ragged, lengths the tiles do not divide
        (16, 3, 128, (33, 70, 16), 1, 0, 0.0, 32),
        (32, 4, 64, (100, 9), 1, 24, 0.0, 64),  # sliding window
        (64, 8, 256, (130,), 1, 0, 30.0, 64),  # soft-cap
        (16, 4, 64, (40, 57), 7, 0, 0.0, 32),  # chunked prefill: 7 new tokens per row
        (8, 3, 128, (29, 50), 5, 10, 50.0, 24),  # chunk + window + soft-cap, block_kv not a page multiple
    ],
)
def test_matches_reference(impl, page_size, ratio, h, lengths, t, window, softcap, block_kv):
    rng = np.random.default_rng(page_size + ratio + h)
    kv_heads = 2 if ratio != 8 else 1
    q, k, v, k_pages, v_pages, table, lens, qpos = _case(
        rng, b=len(lengths), t=t, n=kv_heads * ratio, kv_heads=kv_heads, h=h, page_size=page_size, lengths=lengths
    )
    args = tuple(map(jnp.asarray, (q, k_pages, v_pages, table, lens, qpos)))
    kw = {"window": window, "softcap": softcap, "scale": 0.1}
    ref = paged_attention_reference(*args[:3], None, None, *args[3:], **kw)
    out = paged_attention(*args, impl=impl, interpret=True, block_sizes=BlockSizes(block_kv), **kw)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    # and the reference agrees with the dense cache math the models use today
    kpos = np.where(np.arange(k.shape[1])[None] < lens[:, None], np.arange(k.shape[1])[None], -1)
    dense = dense_attention(q, k, v, qpos, kpos, **kw)
    np.testing.assert_allclose(ref, dense, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kv_dtype, tol", [("int8", INT8_TOL), ("int4", INT4_TOL)])
@pytest.mark.parametrize("impl", ["lax", "pallas"])
@pytest.mark.parametrize(
    "page_size, ratio, h, lengths, t, window", [(16, 4, 64, (200, 77), 1, 0), (8, 1, 128, (61,), 3, 20)]
)
def test_quantized_within_stated_error(kv_dtype, tol, impl, page_size, ratio, h, lengths, t, window):
    rng = np.random.default_rng(7)
    q, _, _, k_pages, v_pages, table, lens, qpos = _case(
        rng, b=len(lengths), t=t, n=2 * ratio, kv_heads=2, h=h, page_size=page_size, lengths=lengths
    )
    k_pages[:, 0] = 0.0  # page 0 holds zeros, as a fresh pool does
    v_pages[:, 0] = 0.0
    kq, ks = quantize_kv(jnp.asarray(k_pages), kv_dtype)
    vq, vs = quantize_kv(jnp.asarray(v_pages), kv_dtype)
    args = (jnp.asarray(table), jnp.asarray(lens), jnp.asarray(qpos))
    exact = paged_attention_reference(q, k_pages, v_pages, None, None, *args, window=window)
    out = paged_attention(
        q, kq, vq, *args, ks, vs, window=window, impl=impl, interpret=True, block_sizes=BlockSizes(64)
    )
    assert _rel(out, exact) < tol
    # the kernel's in-loop dequantization equals attention over the dequantized pages
    deq = paged_attention_reference(q, dequantize_kv(kq, ks), dequantize_kv(vq, vs), None, None, *args, window=window)
    np.testing.assert_allclose(out, deq, atol=3e-5, rtol=3e-5)


def test_int4_roundtrip_and_packing():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, 64)), jnp.float32)
    packed, scale = quantize_kv(x, "int4")
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, 32) and scale.shape == (3, 5)
    err = np.abs(np.asarray(dequantize_kv(packed, scale) - x))
    assert (err <= np.asarray(scale)[..., None] / 2 + 1e-6).all()
    q8, s8 = quantize_kv(x, "int8")
    assert q8.dtype == jnp.int8
    assert _rel(dequantize_kv(q8, s8), x) < 0.01
    zero, zs = quantize_kv(jnp.zeros((2, 8)), "int4")
    assert (np.asarray(dequantize_kv(zero, zs)) == 0).all()


def test_rejects_bad_shapes():
    q = jnp.zeros((2, 1, 4, 64))
    pages = jnp.zeros((2, 5, 8, 64))
    table = jnp.zeros((2, 3), jnp.int32)
    lens = jnp.ones((2,), jnp.int32)
    pos = jnp.zeros((2, 1), jnp.int32)
    with pytest.raises(ValueError, match="q.shape"):
        paged_attention(jnp.zeros((2, 1, 3, 64)), pages, pages, table, lens, pos)
    with pytest.raises(ValueError, match="page_table"):
        paged_attention(q, pages, pages, table.astype(jnp.int16), lens, pos)
    with pytest.raises(ValueError, match="scales"):
        paged_attention(q, pages.astype(jnp.int8), pages.astype(jnp.int8), table, lens, pos)
