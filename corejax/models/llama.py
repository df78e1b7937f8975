"""The Llama family (Llama 2/3, SmolLM2, Mistral-style GQA) as pure functions over a params pytree."""

from __future__ import annotations

from typing import Any

import jax

from corejax.types.config import ModelConfig
from corejax.models.layers import LayerAt, Params, apply_rope, dense, gated_mlp, rms_norm


def attention_block(layer: Params, x: jax.Array, positions: jax.Array, cache: Any, at: LayerAt,
                    cfg: ModelConfig, *, q_norm: jax.Array | None = None,
                    k_norm: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """x [B, T, D] (normed) -> attention output [B, T, D]; writes this layer's keys/values to the cache."""
    batch, t, _ = x.shape
    q = dense(x, layer["wq"]).reshape(batch, t, cfg.num_heads, cfg.head_dim)
    k = dense(x, layer["wk"]).reshape(batch, t, cfg.num_kv_heads, cfg.head_dim)
    v = dense(x, layer["wv"]).reshape(batch, t, cfg.num_kv_heads, cfg.head_dim)
    if q_norm is not None:
        q = rms_norm(q, q_norm, cfg.norm_eps)
        k = rms_norm(k, k_norm, cfg.norm_eps)
    q = apply_rope(q, positions, at.inv_freq)
    k = apply_rope(k, positions, at.inv_freq)
    out, cache = cache.attend(at.index, q, k, v, positions, window=at.window, scale=cfg.attention_scale,
                              softcap=cfg.attn_softcap)
    return dense(out.reshape(batch, t, cfg.num_heads * cfg.head_dim), layer["wo"]), cache


def block(layer: Params, x: jax.Array, positions: jax.Array, cache: Any, at: LayerAt,
          cfg: ModelConfig) -> tuple[jax.Array, Any]:
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.)). x [B, T, D]."""
    h, cache = attention_block(layer, rms_norm(x, layer["attn_norm"], cfg.norm_eps), positions, cache, at, cfg)
    x = x + h
    x = x + gated_mlp(rms_norm(x, layer["ffn_norm"], cfg.norm_eps), layer, cfg.activation)
    return x, cache
