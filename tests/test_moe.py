"""The mixture-of-experts MLP (corejax/models/moe.py) against a dense reference that runs every expert on every
token: float and quantized experts, one layer's experts and the layer loop's stack, a decode step's few rows and
a prefill's many. Model-level parity with transformers and llama.cpp is in test_families.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corejax.kernels.policy import Kernels
from corejax.models.moe import chunk_rows, moe_mlp, route
from corejax.models.stack import stack_layers, stack_values
from corejax.types.config import ModelConfig
from corejax.weights import quant

D, F, E = 64, 32, 8


@pytest.fixture(autouse=True)
def _kernels():
    with Kernels.detect().active():  # what a jit site passes: this process's kernels (native where built)
        yield


def _cfg(k: int = 2, norm: bool = True) -> ModelConfig:
    return ModelConfig(arch="qwen3moe", vocab_size=32, hidden_size=D, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, ffn_size=96, norm_eps=1e-6, rope_theta=1e4, max_context=64, num_experts=E,
                       experts_used=k, expert_ffn_size=F, expert_norm=norm)


def _float_layer(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"router": rng.standard_normal((D, E)).astype(np.float32),
            "x_gate": (rng.standard_normal((E, D, F)) / 8).astype(np.float32),
            "x_up": (rng.standard_normal((E, D, F)) / 8).astype(np.float32),
            "x_down": (rng.standard_normal((E, F, D)) / 6).astype(np.float32)}


def _reference(x: np.ndarray, layer: dict[str, np.ndarray], cfg: ModelConfig) -> np.ndarray:
    """Every expert on every token, weighted by the router (zero for the experts not chosen)."""
    flat = x.reshape(-1, D)
    weights, experts = route(jnp.asarray(flat), jnp.asarray(layer["router"]), cfg)
    dense_w = np.zeros((flat.shape[0], E), np.float32)
    np.put_along_axis(dense_w, np.asarray(experts), np.asarray(weights), axis=1)
    out = np.zeros_like(flat)
    for e in range(E):
        gate, up = flat @ layer["x_gate"][e], flat @ layer["x_up"][e]
        out += dense_w[:, e:e + 1] * ((np.asarray(jax.nn.silu(gate)) * up) @ layer["x_down"][e])
    return out.reshape(x.shape)


def _quantized(layer: dict[str, np.ndarray], bits: int) -> dict:
    """The experts as QuantArrays (checkpoint order [out, in] per expert), stacked like the loader stacks them."""
    q = dict(layer)
    for key in ("x_gate", "x_up", "x_down"):
        q[key] = stack_values([quant.quantize(w.T, bits) for w in layer[key]], free=False)
    return q


def _dequantized(q: dict) -> dict[str, np.ndarray]:
    out = dict(q)
    for key in ("x_gate", "x_up", "x_down"):
        w = q[key]
        out[key] = np.stack([np.asarray(quant.dequantize(dataclasses.replace(
            w, codes=w.codes[e], scales=w.scales[e], mins=None if w.mins is None else w.mins[e]))) for e in range(E)])
    return out


@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("k,norm", [(2, True), (3, False)])
def test_grouped_experts_equal_every_expert_on_every_token(tokens, k, norm):
    cfg = _cfg(k, norm)
    rng = np.random.default_rng(tokens * 10 + k)
    layer = _float_layer(rng)
    x = rng.standard_normal((1, tokens, D)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda x, layer: moe_mlp(x, layer, cfg))(x, layer))
    np.testing.assert_allclose(ours, _reference(x, layer, cfg), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tokens", [2, 40])
def test_quantized_experts_in_the_layer_loop(bits, tokens):
    """Quantized experts read in place from the layer loop's stack ([L, E, ...]: the kernel's index is
    layer * E + expert) equal the same experts dequantized."""
    cfg = _cfg()
    rng = np.random.default_rng(bits + tokens)
    layers = [_quantized(_float_layer(rng), bits) for _ in range(2)]
    stacked = stack_layers({"layers": layers})["layers"]
    x = rng.standard_normal((2, tokens // 2, D)).astype(np.float32)
    for i in range(2):
        ours = np.asarray(jax.jit(lambda x, s, i=i: moe_mlp(x, s.layer(jnp.int32(i)), cfg))(x, stacked))
        ref = _reference(x, _dequantized(layers[i]), cfg)
        assert np.abs(ours - ref).max() <= 2e-3 * np.abs(ref).max()


def test_experts_no_token_chose_are_never_read():
    """NaN in every expert the router did not pick leaves the output finite: an implementation that runs all
    experts and multiplies the unchosen ones by a zero weight would return NaN (0 * NaN)."""
    cfg = _cfg()
    rng = np.random.default_rng(7)
    layer = _float_layer(rng)
    x = rng.standard_normal((1, 2, D)).astype(np.float32)
    _, experts = route(jnp.asarray(x.reshape(-1, D)), jnp.asarray(layer["router"]), cfg)
    unused = sorted(set(range(E)) - set(np.asarray(experts).ravel().tolist()))
    assert unused
    poisoned = {k: v.copy() for k, v in layer.items()}
    for key in ("x_gate", "x_up", "x_down"):
        poisoned[key][unused] = np.nan
    ours = np.asarray(moe_mlp(x, poisoned, cfg))
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, _reference(x, layer, cfg), rtol=2e-5, atol=2e-5)


def test_chunk_rows():
    assert chunk_rows(8, 128) == 1  # a decode step: one row per routed expert
    assert chunk_rows(4096, 128) == 64  # a prefill chunk: capped
    assert chunk_rows(40, 8) == 16


def test_quantized_experts_take_one_kernel_call_and_read_only_routed_experts():
    """With the native kernels, each of gate, up and down is one grouped call (no loop over chunks in the
    program), and NaN scales in the experts nobody chose leave the output finite."""
    if not Kernels.detect().native:
        pytest.skip("the native kernels are not built here")
    cfg = _cfg()
    rng = np.random.default_rng(11)
    layer = _quantized(_float_layer(rng), 8)
    x = rng.standard_normal((1, 2, D)).astype(np.float32)
    text = str(jax.make_jaxpr(lambda x, layer: moe_mlp(x, layer, cfg))(x, layer))
    assert text.count("corejax_quant_matmul_experts") == 3 and "while" not in text
    _, experts = route(jnp.asarray(x.reshape(-1, D)), jnp.asarray(layer["router"]), cfg)
    unused = sorted(set(range(E)) - set(np.asarray(experts).ravel().tolist()))
    poisoned = dict(layer)
    for key in ("x_gate", "x_up", "x_down"):
        w = layer[key]
        poisoned[key] = dataclasses.replace(w, scales=w.scales.at[jnp.asarray(unused)].set(jnp.nan))
    ours = np.asarray(moe_mlp(x, poisoned, cfg))
    assert np.isfinite(ours).all()
    ref = _reference(x, _dequantized(layer), cfg)
    assert np.abs(ours - ref).max() <= 2e-3 * np.abs(ref).max()


@pytest.mark.parametrize("bits", [8, 4])
def test_the_experts_kernel_gives_each_expert_the_dense_kernels_bits(bits):
    """Experts with many rows (AMX passes of 8 where the CPU has them), a few, and none beside each other: each
    expert's rows come out bit for bit as the dense kernel computes them alone (an expert without rows shares its
    row start with the next one; the AMX copy of the next one's activations was once left empty)."""
    from corejax.kernels import ffi
    from corejax.kernels.quant_matmul import quant_matmul, quant_matmul_experts

    ffi.ensure()
    if not ffi.available():
        pytest.skip("native kernels not loaded")
    rng = np.random.default_rng(bits)
    w = [quant.quantize(rng.standard_normal((96, D)).astype(np.float32), bits) for _ in range(E)]  # [out, in]
    stacked = stack_values(w, free=False)
    counts = np.zeros(E, np.int32)
    counts[:4] = [0, 17, 3, 9]
    x = rng.standard_normal((int(counts.sum()) + 2, D)).astype(np.float32)  # 2 padding rows past the counts
    fmt = dict(bits=stacked.bits, block=stacked.block, offset=stacked.offset, code_max=stacked.code_max)
    got = np.asarray(quant_matmul_experts(jnp.asarray(x), stacked.codes, stacked.scales, stacked.mins, None,
                                          jnp.asarray(counts), **fmt))
    start = 0
    for e in range(E):
        n = int(counts[e])
        if n:
            alone = np.asarray(quant_matmul(jnp.asarray(x[start:start + n]), w[e].codes, w[e].scales, w[e].mins,
                                            None, **fmt))
            np.testing.assert_array_equal(got[start:start + n], alone, err_msg=f"expert {e}")
        start += n
    assert not got[start:].any()
