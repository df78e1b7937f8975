"""Building blocks shared by the decoder families: RMSNorm, RoPE, dense projections, gated MLPs, the layer loop."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from corejax.weights import quant
from corejax.types.config import ModelConfig, RopeScaling
from corejax.kernels.policy import current
from corejax.kernels.small_matmul import BlockedWeight, blocked_matmul, blocked_matmul_reference
from corejax.models.stack import LayerWeight, StackedLayers
from corejax.weights.quant import QuantArray

Params = dict[str, Any]


def dense(x: jax.Array, w: jax.Array | QuantArray | BlockedWeight | LayerWeight,
          valid: jax.Array | None = None, layer: jax.Array | int | None = None) -> jax.Array:
    """x [..., D_in] @ w [D_in, D_out] -> float32. Float weights are stored [in, out]: XLA's CPU GEMV is several
    times faster that way than contracting the trailing axis of an [out, in] matrix (docs/MEASUREMENTS.md).
    Quantized weights go through the one quantized matmul; column-blocked ones (when the native kernel is
    loaded) through the native float kernel (kernels/small_matmul.py). `valid` (bool, x.shape[:-1])
    marks padding rows the native float kernel may skip (their outputs are then zero).

    A LayerWeight (one layer of a stacked matrix, in the layer loop) resolves to its stacked group and `layer`,
    an index the kernels read in place; a plain float stack (no native kernels) is sliced by XLA (a copy)."""
    if isinstance(w, LayerWeight):
        return w.apply(lambda stacked, index: dense(x, stacked, valid, index))
    if isinstance(w, QuantArray):
        return quant.matmul(x, w, layer)
    if isinstance(w, BlockedWeight):
        if current().native:
            return blocked_matmul(x, w, valid, layer)
        return blocked_matmul_reference(x, w, layer)
    if layer is not None:
        w = jax.lax.dynamic_index_in_dim(w, layer, keepdims=False)
    if w.dtype != x.dtype and jnp.dtype(w.dtype).itemsize < 4 and current().platform == "gpu":
        # bf16/f16 weights on a GPU: the inputs rounded to the weights' type (as HF's bf16 models run), products
        # summed in float32 by the tensor cores. Without the cast XLA converts every weight to float32 each
        # step. On XLA's CPU backend bf16 dots are slower than float32 (docs/MEASUREMENTS.md): promote there.
        x = x.astype(w.dtype)
    return jnp.einsum("...d,de->...e", x, w, preferred_element_type=jnp.float32)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x [..., D] normalised in float32, times scale [D]. The loader stores Gemma's (1 + w) as scale."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(var + eps)) * scale


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies [head_dim // 2], as HF computes them (float32, before any position product)."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
    # Llama 3.1: low frequencies scaled by factor, high ones kept, a smooth ramp between (HF _compute_llama3_parameters).
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * jnp.pi / inv
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * inv / scaling.factor + smooth * inv
    scaled = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(mid, smoothed, scaled)


@dataclasses.dataclass(frozen=True)
class Rope:
    """The rotation of one set of positions: cos and sin [B, T, 1, rot] (rot = 2 * len(inv_freq)), already scaled by
    LongRoPE's attention factor. Made once per call for each distinct set of frequencies (rope_tables) and shared
    by every layer that has them: inside the layer loop XLA recomputed the cos and sin for every layer and every
    head (a twentieth of an 8-row decode step of SmolLM2, docs/MEASUREMENTS.md)."""

    cos: jax.Array
    sin: jax.Array


jax.tree_util.register_dataclass(Rope, data_fields=["cos", "sin"], meta_fields=[])


def rope_tables(positions: jax.Array, inv_freq: jax.Array, factor: float = 1.0) -> Rope:
    """positions [B, T], inv_freq [rot/2] -> their Rope."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rot/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return Rope(cos, sin)


def apply_rope(x: jax.Array, rope: Rope) -> jax.Array:
    """x [B, T, N, H] -> rotated x, HF's rotate-half layout (the loader undoes llama.cpp's interleaved Q/K
    permutation, so one convention serves both checkpoint formats). With fewer frequencies than H / 2 (partial
    rotary, Phi-3/4) only the first rot dimensions rotate."""
    rot = rope.cos.shape[-1]
    x_rot, x_pass = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = (x_rot * rope.cos + rotated * rope.sin).astype(x.dtype)
    return out if x_pass is None else jnp.concatenate([out, x_pass], axis=-1)


def activate(gate: jax.Array, activation: str) -> jax.Array:
    """A gated MLP's activation: SiLU (SwiGLU) or tanh-approximated GELU (GeGLU)."""
    return jax.nn.silu(gate) if activation == "silu" else jax.nn.gelu(gate, approximate=True)


def gated_mlp(x: jax.Array, layer: Params, activation: str) -> jax.Array:
    """x [B, T, D] -> [B, T, D]: down(act(gate(x)) * up(x)), SwiGLU or GeGLU."""
    return dense(activate(dense(x, layer["w_gate"]), activation) * dense(x, layer["w_up"]), layer["w_down"])


def embed(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """tokens [B, T] -> [B, T, D]. Tied models keep only lm_head [D, V] and gather its columns: one copy of
    the largest matrix, in the layout the per-token LM-head GEMV wants."""
    table = params["lm_head"] if cfg.tie_embeddings else params["embed"]
    if isinstance(table, QuantArray):  # [D, V] quantized: a column per token
        x = quant.take_columns(table, tokens)
    elif isinstance(table, BlockedWeight):
        x = table.columns(tokens)
    elif cfg.tie_embeddings:
        x = jnp.moveaxis(jnp.take(table, tokens, axis=1), 0, -1)  # [D, V] -> [B, T, D]
    else:
        x = jnp.take(table, tokens, axis=0)  # [V, D]
    x = x.astype(jnp.float32)
    if cfg.embed_scale != 1.0:
        x = x * jnp.float32(cfg.embed_scale)
    return x


def lm_head(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """hidden [B, T, D] (already final-normed) -> logits [B, T, V] float32."""
    logits = dense(hidden, params["lm_head"])
    if cfg.logit_scale != 1.0:  # Granite divides its logits by logits_scaling
        logits = logits * jnp.float32(cfg.logit_scale)
    if cfg.final_softcap:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits


@dataclasses.dataclass(frozen=True)
class LayerAt:
    """What differs between layers besides weights: the index (a Python int when unrolled, traced in the loop),
    the attention window (0 = none) and the RoPE rotation (Gemma's local layers have their own base)."""

    index: jax.Array | int
    window: jax.Array | int
    rope: Rope


def layer_theta(cfg: ModelConfig, index: int) -> float:
    """RoPE base of layer `index`: Gemma's sliding-window layers use rope_local_theta when the model sets one."""
    return cfg.rope_local_theta if cfg.layer_windows[index] > 0 and cfg.rope_local_theta else cfg.rope_theta


def _rope_kind(cfg: ModelConfig, index: int) -> tuple[float, bool, bool]:
    """What layer_inv_freq depends on for layer `index` besides the model's own settings: (base, local, has RoPE).
    Gemma 3's RoPE scaling is its global layers' (HF's rope_parameters["full_attention"], llama.cpp's
    freq_scale_swa = 1): the local layers keep unscaled frequencies of their own base."""
    local = cfg.layer_windows[index] > 0 and bool(cfg.rope_local_theta)
    return layer_theta(cfg, index), local, bool(cfg.rope_layers[index])


def layer_inv_freq(cfg: ModelConfig, index: int) -> jax.Array:
    theta, local, has_rope = _rope_kind(cfg, index)
    inv_freq = rope_inv_freq(cfg.rotary_dim, theta, None if local else cfg.rope_scaling)
    if cfg.rope_factors:  # llama.cpp's rope_freqs: theta_i / factor_i
        inv_freq = inv_freq / jnp.asarray(cfg.rope_factors, jnp.float32)
    if not has_rope:  # no RoPE here (SmolLM3): rotating by angle 0 leaves q and k as they are
        inv_freq = jnp.zeros_like(inv_freq)
    return inv_freq


def layer_ropes(cfg: ModelConfig, positions: jax.Array, num_layers: int) -> tuple[list[Rope], list[int]]:
    """The distinct rotations of the layers (one for most models, two for Gemma's local and global layers) and
    which one each layer uses."""
    kinds = [_rope_kind(cfg, i) for i in range(num_layers)]
    distinct = list(dict.fromkeys(kinds))
    ropes = [rope_tables(positions, layer_inv_freq(cfg, kinds.index(k)), cfg.rope_attn_factor) for k in distinct]
    return ropes, [distinct.index(k) for k in kinds]


def run_layers(
    params: Params,
    x: jax.Array,
    positions: jax.Array,
    cache: Any,
    cfg: ModelConfig,
    block: Callable[..., tuple[jax.Array, Any]],
) -> tuple[jax.Array, Any]:
    """Applies block(layer_params, x, positions, cache, at: LayerAt, cfg) for each layer, then the final norm.

    Stacked layers (models/stack.py; what a ModelRunner runs) go through a `fori_loop`: one compiled layer, the
    weights read in place by the kernels at the loop's index, window and RoPE frequencies as per-layer data, so
    a program's size and compile time do not grow with the layer count. A list of per-layer dicts is unrolled
    (the reference the loop is tested against)."""
    layers = params["layers"]
    if isinstance(layers, StackedLayers):
        windows = jnp.asarray(cfg.layer_windows, jnp.int32)
        ropes, which = layer_ropes(cfg, positions, layers.num_layers)
        if len(ropes) > 1:
            cos, sin = jnp.stack([r.cos for r in ropes]), jnp.stack([r.sin for r in ropes])
            which_rope = jnp.asarray(which, jnp.int32)

        def body(i, carry):
            x, cache = carry
            rope = ropes[0] if len(ropes) == 1 else Rope(cos[which_rope[i]], sin[which_rope[i]])
            return block(layers.layer(i), x, positions, cache, LayerAt(i, windows[i], rope), cfg)

        x, cache = jax.lax.fori_loop(0, layers.num_layers, body, (x, cache))
    else:
        ropes, which = layer_ropes(cfg, positions, len(layers))
        for index, layer in enumerate(layers):
            at = LayerAt(index, cfg.layer_windows[index], ropes[which[index]])
            x, cache = block(layer, x, positions, cache, at, cfg)
    return rms_norm(x, params["final_norm"], cfg.norm_eps), cache
