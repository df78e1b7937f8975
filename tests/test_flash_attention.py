"""Flash attention (lax and Pallas-interpret paths) against its reference and the dense cache math."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from corejax.kernels.flash_attention import (
    BlockSizes,
    flash_attention,
    flash_attention_reference,
)

from corejax.kernels.flash_attention import flash_attention_reference as dense_attention


def _inputs(rng, *, b, t, s, n, kv_heads, h, lengths, offset=0):
    """Queries at positions offset .. offset + t - 1 of each row; keys at 0 .. s - 1, -1 past each row's length."""
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, kv_heads, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, kv_heads, h)), jnp.float32)
    q_positions = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), (b, t))
    idx = np.arange(s)[None, :]
    k_positions = jnp.asarray(np.where(idx < np.asarray(lengths)[:, None], idx, -1), jnp.int32)
    return q, k, v, q_positions, k_positions


@pytest.mark.parametrize("impl", ["lax", "pallas"])
@pytest.mark.parametrize(
    "ratio, h, t, lengths, window, softcap, block",
    [
        (1, 64, 37, (37, 20), 0, 0.0, (16, 8)),  # ragged prompts, T not a multiple of either tile
        (3, 128, 24, (24,), 0, 0.0, (8, 16)),
        (4, 64, 50, (50, 33), 9, 0.0, (16, 16)),  # sliding window: most key tiles skipped
        (8, 256, 19, (19,), 0, 30.0, (32, 8)),  # soft-cap, tile larger than T
        (4, 128, 33, (33, 33), 7, 20.0, (8, 8)),  # window + soft-cap
    ],
)
def test_matches_reference(impl, ratio, h, t, lengths, window, softcap, block):
    rng = np.random.default_rng(ratio * h + t)
    kv_heads = 2 if ratio < 8 else 1
    q, k, v, qp, kp = _inputs(
        rng, b=len(lengths), t=t, s=t, n=kv_heads * ratio, kv_heads=kv_heads, h=h, lengths=lengths
    )
    kw = {"window": window, "softcap": softcap, "scale": h**-0.5}
    ref = flash_attention_reference(q, k, v, qp, kp, **kw)
    out = flash_attention(q, k, v, qp, kp, impl=impl, interpret=True, block_sizes=BlockSizes(*block), **kw)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    # rows that see at least one key (in a real prompt: every row) equal the dense cache math
    seen = np.asarray(qp < np.asarray(lengths)[:, None])  # [B, T]
    dense = dense_attention(q, k, v, qp, kp, **kw)
    np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(dense)[seen], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["lax", "pallas"])
def test_chunk_against_longer_keys(impl):
    """A prefill chunk at positions 20..31 over 32 cached keys (the chunked-prefill shape) with a window."""
    rng = np.random.default_rng(3)
    q, k, v, qp, kp = _inputs(rng, b=2, t=12, s=32, n=4, kv_heads=2, h=64, lengths=(32, 32), offset=20)
    ref = flash_attention_reference(q, k, v, qp, kp, window=6)
    out = flash_attention(q, k, v, qp, kp, window=6, impl=impl, interpret=True, block_sizes=BlockSizes(8, 8))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_bf16_inputs_and_default_impl():
    rng = np.random.default_rng(5)
    q, k, v, qp, kp = _inputs(rng, b=1, t=40, s=40, n=4, kv_heads=1, h=64, lengths=(40,))
    ref = flash_attention_reference(q, k, v, qp, kp)
    out = flash_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), qp, kp)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=3e-2)


def test_rejects_bad_shapes():
    q = jnp.zeros((1, 4, 6, 64))
    k = jnp.zeros((1, 4, 4, 64))
    pos = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="q.shape"):
        flash_attention(q, k, k, pos, pos)
    with pytest.raises(ValueError, match="positions"):
        flash_attention(q[:, :, :4], k, k, pos[:, :3], pos)
    with pytest.raises(ValueError, match="impl"):
        flash_attention(q[:, :, :4], k, k, pos, pos, impl="cuda")
