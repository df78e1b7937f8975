"""The native CPU kernels (kernels/*.cc through XLA's FFI) against their XLA references, over shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corejax.kernels import ffi
from corejax.kernels.paged_decode import paged_decode, paged_decode_reference
from corejax.kernels.small_matmul import blocked_matmul, blocked_matmul_reference, to_blocked

pytestmark = pytest.mark.skipif(not ffi.ensure(), reason="the native kernels could not be built here (no g++?)")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 64, 203])
@pytest.mark.parametrize("k,n", [(64, 32), (576, 192), (576, 1536), (1536, 576), (640, 1024)])
def test_blocked_matmul_matches_the_dense_product(rows, k, n):
    rng = np.random.default_rng(rows * 7 + n)
    x = rng.standard_normal((rows, k), np.float32)
    w = rng.standard_normal((k, n), np.float32)
    bw = to_blocked(w)
    got = np.asarray(jax.jit(blocked_matmul)(jnp.asarray(x), bw))
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.sqrt(k))
    np.testing.assert_allclose(np.asarray(blocked_matmul_reference(jnp.asarray(x), bw)), got, rtol=1e-4,
                               atol=1e-3 * np.sqrt(k))


def test_blocked_matmul_skips_padding_rows():
    """Rows marked invalid (an encoder's padding tokens) come back zero; the others are the full product's."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 13, 384), np.float32)
    w = rng.standard_normal((384, 1152), np.float32)
    valid = np.arange(13)[None, :] < np.array([[9], [13]])
    got = np.asarray(jax.jit(blocked_matmul)(jnp.asarray(x), to_blocked(w), jnp.asarray(valid)))
    want = np.where(valid[..., None], x.astype(np.float64) @ w.astype(np.float64), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.sqrt(384))
    assert np.all(got[0, 9:] == 0.0)


def test_blocked_weight_keeps_leading_axes_and_columns():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96), np.float32)
    bw = to_blocked(w)
    assert bw.shape == (48, 96)
    x = rng.standard_normal((2, 3, 48), np.float32)
    np.testing.assert_allclose(np.asarray(blocked_matmul(jnp.asarray(x), bw)), x @ w, rtol=1e-5, atol=1e-4)
    ids = np.array([[0, 31, 32, 95]])
    np.testing.assert_array_equal(np.asarray(bw.columns(jnp.asarray(ids))), w[:, ids].transpose(1, 2, 0))


CASES = [  # B, T, N, K, H, page_size, pages_per_seq, layers, window, softcap
    (1, 1, 9, 3, 64, 16, 16, 3, 0, 0.0),
    (8, 1, 9, 3, 64, 16, 16, 2, 0, 0.0),
    (3, 4, 4, 1, 256, 16, 8, 2, 20, 0.0),
    (2, 8, 4, 2, 32, 8, 6, 1, 0, 30.0),
    (4, 2, 6, 2, 64, 16, 4, 2, 5, 0.0),
    (2, 3, 2, 1, 8, 4, 5, 1, 3, 0.0),
    (5, 1, 8, 8, 16, 32, 3, 2, 0, 50.0),
]


@pytest.mark.parametrize("case", CASES)
def test_paged_decode_matches_paged_attention(case):
    b, t, n, k, h, ps, w, layers, window, softcap = case
    rng = np.random.default_rng(sum(case[:8]))
    pages = b * w + 2
    kp = jnp.asarray(rng.standard_normal((layers, k, pages, ps, h), np.float32))
    vp = jnp.asarray(rng.standard_normal((layers, k, pages, ps, h), np.float32))
    table = jnp.asarray(rng.permutation(np.arange(1, pages))[:b * w].reshape(b, w).astype(np.int32))
    lengths = rng.integers(t, w * ps + 1, b).astype(np.int32)
    if b > 2:
        lengths[0] = 0  # a padding row: sees nothing, returns zeros
    q_positions = np.maximum(lengths[:, None] - t + np.arange(t)[None], 0).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((b, t, n, h), np.float32))
    layer = layers - 1
    fn = jax.jit(paged_decode, static_argnames=("layer", "window", "softcap"))
    got = fn(q, kp, vp, layer, table, jnp.asarray(lengths), jnp.asarray(q_positions), window=window, softcap=softcap)
    want = paged_decode_reference(q, kp, vp, layer, table, jnp.asarray(lengths), jnp.asarray(q_positions),
                                  window=window, softcap=softcap)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-6)
    if b > 2:
        assert not np.asarray(got[0]).any()


def test_runtime_blocks_decoder_weights(tmp_path):
    from corejax.hub import ModelSource
    from corejax.kernels.small_matmul import BlockedWeight
    from corejax.runtime import Runtime
    from tiny_model import write_tiny_llama

    rt = Runtime(ModelSource("tiny", "gguf", write_tiny_llama(tmp_path / "t.gguf", quantize=None)), progress=False)
    assert rt.info()["native_kernels"] is True
    layer = rt.model.params["layers"][0]
    assert isinstance(layer["wq"], BlockedWeight) and isinstance(layer["w_down"], BlockedWeight)
    assert not isinstance(layer["wk"], BlockedWeight)  # 16 columns: not a whole block, stays on XLA's dot
    assert not isinstance(rt.model.params["lm_head"], BlockedWeight)  # its vocabulary is not a multiple of 32
