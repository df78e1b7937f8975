"""QuantArray: GGUF blocks kept quantized dequantize bit-exactly, and the quantized matmul matches f32."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import corejax
from corejax.kernels.policy import Kernels
from corejax.weights import quant
from corejax.errors import InvalidParameterError
from corejax.loading.ggml_quants import BLOCK_SIZES, UNPACKERS, GGMLType, dequantize
from gguf_factory import finite_blocks
from tiny_model import write_tiny_llama

FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _gguf_matrix(fmt: str, d_out: int, d_in: int, seed: int = 0):
    """Random blocks of `fmt` for an [d_out, d_in] weight -> (QuantArray, reference f32 [d_out, d_in])."""
    t = GGMLType[fmt]
    block, _ = BLOCK_SIZES[t]
    raw = finite_blocks(np.random.default_rng(seed), fmt, d_out * d_in // block)
    ref = dequantize(raw.reshape(-1), t, (d_out, d_in))
    q = UNPACKERS[t](raw)
    qa = quant.from_blocks(q.codes.reshape(d_out, -1), q.scales.reshape(d_out, -1),
                           None if q.mins is None else q.mins.reshape(d_out, -1), fmt=fmt)
    return qa, ref


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d_out,d_in", [(96, 256), (40, 512)])
def test_gguf_blocks_dequantize_bit_exactly(fmt, d_out, d_in):
    qa, ref = _gguf_matrix(fmt, d_out, d_in)
    assert qa.shape == (d_in, d_out)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(qa)), ref.T)
    packed = fmt in ("Q4_0", "Q4_1", "Q4_K")
    assert (qa.bits == 4) == packed or fmt in ("Q2_K", "Q3_K")  # 2/3-bit codes also fit a nibble


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("d_out,d_in", [(96, 256), (40, 512), (4100, 64)])
def test_native_repack_is_byte_identical_to_from_blocks(fmt, d_out, d_in, narrow):
    """quant.from_ggml (kernels/ggml_repack.cc, one pass over the file's blocks) builds the same arrays as
    from_blocks on the NumPy-unpacked codes: codes, scales, mins and the static fields."""
    from corejax.kernels import ffi

    if not ffi.ensure():
        pytest.skip("the native kernels could not be built here")
    t = GGMLType[fmt]
    block, size = BLOCK_SIZES[t]
    raw = finite_blocks(np.random.default_rng(d_out), fmt, d_out * d_in // block)
    if narrow:  # codes whose range moves the offset off its usual value (the kernel's general path)
        if fmt == "Q8_0":
            raw[:, 2:] = (raw[:, 2:].view(np.int8) // 3).view(np.uint8)
        else:
            raw[:, size - 16:] |= 0x88 if fmt == "Q4_0" else 0x11
    q = UNPACKERS[t](raw)
    want = quant.from_blocks(q.codes.reshape(d_out, -1), q.scales.reshape(d_out, -1),
                             None if q.mins is None else q.mins.reshape(d_out, -1), fmt=fmt)
    got = quant.from_ggml(raw.reshape(d_out, d_in // block * size), d_in, fmt)
    assert got is not None
    for name in ("shape", "block", "bits", "offset", "code_max"):
        assert getattr(got, name) == getattr(want, name), name
    for name in ("codes", "scales", "mins"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _matmul(kernels: Kernels):
    """quant.matmul as a jit site calls it: under a kernel policy."""
    def run(x, w):
        with kernels.active():
            return quant.matmul(x, w)

    return run


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q2_K", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 40])
def test_native_quantized_matmul(fmt, rows):
    """kernels/quant_matmul.cc (activations as two int8 roundings, integer dots) against the float product
    with the same dequantized weights: measured relative error <= 3.2e-5 over these formats and shapes.
    40 rows take the multi-threaded prefill path; d_out 40 is padded to a group of 16."""
    from corejax.kernels import ffi

    if not ffi.ensure():
        pytest.skip("native kernels not built here (no C++ compiler)")
    for d_out, d_in in ((96, 512), (40, 256)):
        qa, ref = _gguf_matrix(fmt, d_out, d_in, seed=3)
        x = np.random.default_rng(rows).standard_normal((rows, d_in)).astype(np.float32)
        got = np.asarray(jax.jit(_matmul(Kernels.detect()))(jnp.asarray(x), qa))
        assert got.shape == (rows, d_out)
        exact = x @ ref.T
        np.testing.assert_allclose(got, exact, rtol=0, atol=2e-4 * np.abs(exact).max())
        rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
        assert rel < 1e-4, rel


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_xla_fallback_matmul_matches_dequantized_f32(fmt):
    """Without the native kernels (GPUs, no compiler): float activations, dequantized weights, exact."""
    qa, ref = _gguf_matrix(fmt, 96, 512, seed=3)
    x = np.random.default_rng(4).standard_normal((3, 5, 512)).astype(np.float32)
    got = np.asarray(jax.jit(_matmul(Kernels.xla()))(jnp.asarray(x), qa))
    want = x @ ref.T
    assert got.shape == (3, 5, 96)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_take_columns_is_a_dequantized_column_lookup():
    qa, ref = _gguf_matrix("Q4_1", 64, 256, seed=5)
    ids = jnp.asarray([[0, 63, 17], [5, 5, 40]])
    np.testing.assert_array_equal(np.asarray(quant.take_columns(qa, ids)), ref[np.asarray(ids)])


@pytest.mark.parametrize("bits,tol", [(8, 0.01), (4, 0.12)])
def test_quantize_float_weights_within_stated_error(bits, tol):
    w = np.random.default_rng(6).standard_normal((128, 256)).astype(np.float32)
    qa = quant.quantize(w, bits)
    err = np.linalg.norm(np.asarray(quant.dequantize(qa)) - w.T) / np.linalg.norm(w)
    assert err < tol, err
    assert qa.nbytes < w.nbytes / (3 if bits == 8 else 5)


def test_quantize_rejects_bad_arguments():
    with pytest.raises(InvalidParameterError, match="8 or 4 bits"):
        quant.quantize(np.zeros((8, 64), np.float32), 3)
    with pytest.raises(InvalidParameterError, match="blocks of 32"):
        quant.quantize(np.zeros((8, 40), np.float32), 8)


@pytest.mark.parametrize("weights,tol", [("native", 1e-3), ("int8", 0.05), ("int4", 0.5)])
def test_model_logits_quantized_vs_f32(tmp_path, weights, tol):
    """Native keeps the file's Q8_0 FFN blocks (the same values as f32); int8/int4 re-quantize every matrix;
    all three run the native kernel (activations as two int8 roundings; without it, float activations).
    Relative logit error measured on this 2-layer, 32-wide random model: native ~1e-4 (the activations
    alone), int8 2.8%, int4 35% (small random models are the worst case: nothing averages out)."""
    from corejax.kernels import ffi

    ffi.ensure()
    from corejax.engine.programs import full_logits
    from corejax.hub import ModelSource
    from corejax.loading.loader import load_model

    path = write_tiny_llama(tmp_path / "tiny.gguf", context=64)
    source = ModelSource("tiny", "gguf", path)
    dense = load_model(source, weights="f32", progress=False)
    other = load_model(source, weights=weights, progress=False)
    assert other.info["weight_bytes"] < dense.info["weight_bytes"]
    ids = jnp.asarray([dense.tokenizer.encode("the cat sat on the mat")])
    a = np.asarray(full_logits(dense.params, ids, cfg=dense.cfg))
    b = np.asarray(full_logits(other.params, ids, cfg=other.cfg))
    assert np.linalg.norm(a - b) <= tol * np.linalg.norm(a)


def test_session_with_native_weights_generates_the_same_greedy_text(tmp_path, monkeypatch):
    """Without the native kernel, kept-quantized weights compute exactly the f32 path's values (same weights,
    float activations): the same greedy tokens. (The kernel's int8 activations: test_model_logits_*.)"""
    path = write_tiny_llama(tmp_path / "tiny.gguf", context=64)
    from corejax.hub import ModelSource
    from corejax.kernels import ffi
    from corejax.worker.start import open_runtime

    monkeypatch.setattr(ffi, "available", lambda: False)
    monkeypatch.setattr(ffi, "ensure", lambda path=None: False)
    outs = []
    for weights in ("f32", "native"):
        rt = open_runtime(ModelSource("tiny", "gguf", path), weights=weights, progress=False)
        chunks = list(rt.stream("the cat", None, corejax.SamplingParams(temperature=0, max_tokens=20,
                                                                         ignore_eos=True)))
        outs.append(chunks[-1].result.tokens)
    assert outs[0] == outs[1]
