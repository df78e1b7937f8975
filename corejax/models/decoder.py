"""The decoder block every supported family runs (Llama, Mistral, Qwen2/3, Gemma 2/3, SmolLM3, Granite, OLMo 2,
and the mixtures of experts Qwen3-MoE, OLMoE, Mixtral), a pure function over a params pytree. What differs between families is data in ModelConfig (types/families.py):
biases, where the norms sit, Q/K norms, multipliers; what differs between layers is data in LayerAt (the window,
the RoPE rotation, by angle 0 in a layer without RoPE)."""

from __future__ import annotations

from typing import Any

import jax

from corejax.models.layers import LayerAt, Params, apply_rope, dense, gated_mlp, rms_norm
from corejax.models.moe import moe_mlp
from corejax.types.config import ModelConfig


def _project(x: jax.Array, layer: Params, key: str, heads: int, cfg: ModelConfig) -> jax.Array:
    """x [B, T, D] -> [B, T, heads, H] through layer[w{key}] (+ its bias, + its norm)."""
    batch, t, _ = x.shape
    y = dense(x, layer[f"w{key}"])
    if cfg.qkv_bias:
        y = y + layer[f"b{key}"]
    if cfg.qk_norm == "full" and key in "qk":  # OLMo 2: one RMSNorm over the whole projection
        y = rms_norm(y, layer[f"{key}_norm"], cfg.norm_eps)
    y = y.reshape(batch, t, heads, cfg.head_dim)
    if cfg.qk_norm == "head" and key in "qk":  # Qwen3, Gemma 3: over each head
        y = rms_norm(y, layer[f"{key}_norm"], cfg.norm_eps)
    return y


def attention_block(layer: Params, x: jax.Array, positions: jax.Array, cache: Any, at: LayerAt,
                    cfg: ModelConfig) -> tuple[jax.Array, Any]:
    """x [B, T, D] -> attention output [B, T, D]; writes this layer's keys/values to the cache."""
    batch, t, _ = x.shape
    q = apply_rope(_project(x, layer, "q", cfg.num_heads, cfg), at.rope)
    k = apply_rope(_project(x, layer, "k", cfg.num_kv_heads, cfg), at.rope)
    v = _project(x, layer, "v", cfg.num_kv_heads, cfg)
    out, cache = cache.attend(at.index, q, k, v, positions, window=at.window, scale=cfg.attention_scale,
                              softcap=cfg.attn_softcap)
    return dense(out.reshape(batch, t, cfg.num_heads * cfg.head_dim), layer["wo"]), cache


def block(layer: Params, x: jax.Array, positions: jax.Array, cache: Any, at: LayerAt,
          cfg: ModelConfig) -> tuple[jax.Array, Any]:
    """One residual block, x [B, T, D]: x + attn(.), then x + mlp(.). "pre" norms each sub-block's input (Llama),
    "sandwich" its input and its output (Gemma), "post" only its output (OLMo 2)."""
    eps = cfg.norm_eps
    pre = cfg.norms != "post"
    post = cfg.norms != "pre"
    h, cache = attention_block(layer, rms_norm(x, layer["attn_norm"], eps) if pre else x, positions, cache, at, cfg)
    if post:
        h = rms_norm(h, layer["post_attn_norm"], eps)
    x = x + (h * cfg.residual_scale if cfg.residual_scale != 1.0 else h)
    h = rms_norm(x, layer["ffn_norm"], eps) if pre else x
    h = moe_mlp(h, layer, cfg) if cfg.num_experts else gated_mlp(h, layer, cfg.activation)
    if post:
        h = rms_norm(h, layer["post_ffn_norm"], eps)
    return x + (h * cfg.residual_scale if cfg.residual_scale != 1.0 else h), cache
