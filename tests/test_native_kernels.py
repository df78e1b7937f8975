"""The native CPU kernels (kernels/*.cc through XLA's FFI) against their XLA references, over shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corejax.kernels import ffi
from corejax.kernels.paged_native import paged_attention_native, paged_attention_native_reference
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
    # long contexts (keys split over tasks), prefill chunks (query blocks, transposed key tiles), head sizes
    # with a tail past whole vectors
    (1, 1, 9, 3, 64, 16, 160, 2, 0, 0.0),
    (3, 2, 32, 8, 128, 16, 70, 1, 0, 0.0),
    (1, 100, 9, 3, 64, 16, 16, 1, 0, 0.0),
    (2, 70, 4, 1, 256, 16, 10, 1, 48, 0.0),
    (1, 33, 8, 2, 48, 8, 12, 1, 0, 20.0),
    (2, 40, 2, 1, 8, 4, 20, 1, 0, 0.0),
    (1, 512, 15, 5, 64, 16, 64, 1, 0, 0.0),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
def test_native_paged_attention_matches_paged_attention(case, dtype):
    """float32 pages, and bfloat16 pages widened as they are read (against the reference on the same values
    in float32)."""
    b, t, n, k, h, ps, w, layers, window, softcap = case
    rng = np.random.default_rng(sum(case[:8]))
    pages = b * w + 2
    kp = jnp.asarray(rng.standard_normal((layers, k, pages, ps, h), np.float32)).astype(dtype)
    vp = jnp.asarray(rng.standard_normal((layers, k, pages, ps, h), np.float32)).astype(dtype)
    table = jnp.asarray(rng.permutation(np.arange(1, pages))[:b * w].reshape(b, w).astype(np.int32))
    lengths = rng.integers(t, w * ps + 1, b).astype(np.int32)
    if b > 2:
        lengths[0] = 0  # a padding row: sees nothing, returns zeros
    q_positions = np.maximum(lengths[:, None] - t + np.arange(t)[None], 0).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((b, t, n, h), np.float32))
    layer = layers - 1
    fn = jax.jit(paged_attention_native, static_argnames=("layer", "window", "softcap"))
    got = fn(q, kp, vp, layer, table, jnp.asarray(lengths), jnp.asarray(q_positions), window=window, softcap=softcap)
    want = paged_attention_native_reference(q, kp.astype(jnp.float32), vp.astype(jnp.float32), layer, table,
                                  jnp.asarray(lengths), jnp.asarray(q_positions), window=window, softcap=softcap)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-6)
    if b > 2:
        assert not np.asarray(got[0]).any()


def test_runtime_blocks_decoder_weights(tmp_path):
    from corejax.hub import ModelSource
    from corejax.kernels.small_matmul import BlockedWeight
    from corejax.worker.start import open_runtime
    from tiny_model import write_tiny_llama

    rt = open_runtime(ModelSource("tiny", "gguf", write_tiny_llama(tmp_path / "t.gguf", quantize=None)), progress=False)
    assert rt.info()["native_kernels"] is True
    layers = rt.model.params["layers"]  # stacked for the layer loop (corejax/models/stack.py), one group each
    wq, w_down, wk = (layers.groups[key][0] for key in ("wq", "w_down", "wk"))
    assert isinstance(wq, BlockedWeight) and isinstance(w_down, BlockedWeight) and wq.data.ndim == 4
    assert not isinstance(wk, BlockedWeight)  # 16 columns: not a whole block, stays on XLA's dot
    assert not isinstance(rt.model.params["lm_head"], BlockedWeight)  # its vocabulary is not a multiple of 32


def _gelu64(x: np.ndarray) -> np.ndarray:
    import math

    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


_ACTS = {"none": lambda x: x, "relu": lambda x: np.maximum(x, 0.0), "gelu": _gelu64,
         "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))}


@pytest.mark.parametrize("act", list(_ACTS))
def test_fused_activation_is_accurate_over_its_range(act):
    """kernels/vecmath.h's exp/erf/tanh: the bias + activation epilogue on values spread over [-10, 10]
    (x @ identity + bias) against float64 math."""
    from corejax.kernels.small_matmul import fused_matmul_bias_act

    v = np.linspace(-10.0, 10.0, 64 * 32, dtype=np.float32).reshape(64, 32)
    got = np.asarray(jax.jit(fused_matmul_bias_act, static_argnums=3)(
        jnp.asarray(v), to_blocked(np.eye(32, dtype=np.float32)), jnp.zeros(32), act))
    want = _ACTS[act](v.astype(np.float64))
    # erf's absolute error (1.5e-7, Abramowitz & Stegun 7.1.26) scaled by GELU's 0.5 |x|: ~1e-7 |x| absolute
    err = np.abs(got - want) - (2e-6 * np.abs(want) + 1e-7 * np.maximum(1.0, np.abs(v)))
    assert err.max() <= 0, (v.flat[err.argmax()], got.flat[err.argmax()], want.flat[err.argmax()])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bfloat16"])
@pytest.mark.parametrize("rows", [1, 8, 13, 75])
@pytest.mark.parametrize("padding", ["middle", "tail"])
def test_fused_epilogues_match_numpy(dtype, rows, padding):
    """act(x @ w + b) and LayerNorm(residual + x @ w + b), float32, float16 or bfloat16 weights (bfloat16
    rounding the rows too), padding rows zero: one in the middle (gathered) or the last ones (a sentence
    padded to its bucket: no gathering)."""
    import ml_dtypes

    from corejax.kernels.small_matmul import fused_matmul_add_norm, fused_matmul_bias_act

    if dtype == "bfloat16" and not ffi.bf16_dot():
        pytest.skip("the kernel path (this CPU or COREJAX_ISA) has no AVX512_BF16")
    dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    rng = np.random.default_rng(rows)
    k, n = 96, 128
    x = rng.standard_normal((rows, k), np.float32)
    w = (rng.standard_normal((k, n)) * 0.2).astype(dtype)
    bias, scale, shift = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    residual = rng.standard_normal((rows, n), np.float32)
    valid = np.arange(rows) != rows // 2 if padding == "middle" else np.arange(rows) < rows - rows // 3
    rows_in = x.astype(ml_dtypes.bfloat16) if dtype == ml_dtypes.bfloat16 else x
    y = rows_in.astype(np.float64) @ w.astype(np.float64) + bias
    got = np.asarray(fused_matmul_bias_act(jnp.asarray(x), to_blocked(w), jnp.asarray(bias), "gelu",
                                           jnp.asarray(valid)))
    np.testing.assert_allclose(got, np.where(valid[:, None], _gelu64(y), 0.0), rtol=1e-4, atol=1e-4)
    h = residual + y
    normed = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-12) * scale + shift
    got = np.asarray(fused_matmul_add_norm(jnp.asarray(x), to_blocked(w), jnp.asarray(bias),
                                           jnp.asarray(residual), jnp.asarray(scale), jnp.asarray(shift), 1e-12,
                                           jnp.asarray(valid)))
    np.testing.assert_allclose(got, np.where(valid[:, None], normed, 0.0), rtol=1e-4, atol=1e-4)


def test_float16_blocked_weights_are_widened_exactly():
    """A float16 BlockedWeight gives x @ float32(w16): the kernel's widening loses nothing more."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 384), np.float32)
    w16 = rng.standard_normal((384, 1152)).astype(np.float16)
    bw = to_blocked(w16)
    assert bw.dtype == jnp.float16
    got = np.asarray(jax.jit(blocked_matmul)(jnp.asarray(x), bw))
    np.testing.assert_allclose(got, x.astype(np.float64) @ w16.astype(np.float64), rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not ffi.bf16_dot(), reason="the kernel path (this CPU or COREJAX_ISA) has no AVX512_BF16: bfloat16 weights go to XLA's dot")
@pytest.mark.parametrize("rows", [1, 5, 14, 15, 29, 48, 100])
def test_bfloat16_blocked_weights_multiply_bfloat16_rows(rows):
    """A bfloat16 BlockedWeight (rows in pairs, for vdpbf16ps) gives bf16(x) @ w16 summed in float32, over
    strip sizes 1..14 and several strips, and on AMX tiles (32+ real rows, where granted: whole 32-row groups
    and a partial last one); padding rows are zero; the XLA path reads the same layout."""
    import ml_dtypes

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 384), np.float32)
    w = rng.standard_normal((384, 96)).astype(ml_dtypes.bfloat16)
    bw = to_blocked(w)
    assert bw.dtype == jnp.bfloat16 and bw.shape == (384, 96)
    np.testing.assert_array_equal(np.asarray(bw.unpaired()), np.asarray(to_blocked(w.astype(np.float32)).data))
    valid = np.arange(rows) % 3 != 1
    got = np.asarray(jax.jit(blocked_matmul)(jnp.asarray(x), bw, jnp.asarray(valid)))
    want = x.astype(ml_dtypes.bfloat16).astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-4)
    assert np.all(got[~valid] == 0.0)
    np.testing.assert_allclose(np.asarray(blocked_matmul_reference(jnp.asarray(x), bw)),
                               x.astype(np.float64) @ w.astype(np.float64), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="even"):
        to_blocked(w[:383])


@pytest.mark.parametrize("b,t,n,h", [(1, 16, 12, 32), (3, 37, 4, 64), (2, 8, 4, 8), (2, 130, 2, 20)])
def test_encoder_attention_matches_flash_attention(b, t, n, h):
    """kernels/encoder_attention.cc over the fused [q | k | v] rows vs the tiled flash kernel (non-causal,
    padding keys at position -1): real query rows agree, padding rows are zero, an empty sequence too."""
    from corejax.kernels.flash_attention import flash_attention
    from corejax.kernels.encoder_attention import encoder_attention

    rng = np.random.default_rng(t)
    qkv = rng.standard_normal((b, t, 3 * n * h), np.float32)
    lengths = np.array([t, max(1, t // 3), 0][:b], np.int32)
    got = np.asarray(jax.jit(encoder_attention, static_argnums=2)(jnp.asarray(qkv), jnp.asarray(lengths), n))
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    key_pos = np.where(pos < lengths[:, None], pos, -1)
    q, k, v = (jnp.asarray(qkv.reshape(b, t, 3, n, h)[:, :, i]) for i in range(3))
    want = np.asarray(flash_attention(q, k, v, jnp.asarray(pos), jnp.asarray(key_pos), causal=False)).reshape(b, t, -1)
    real = pos < lengths[:, None]
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert np.all(got[~real] == 0.0)
