"""Gemma 3 text decoders: sandwich norms, Q/K RMSNorm, GeGLU, sliding-window local layers with their own RoPE base."""

from __future__ import annotations

from typing import Any

import jax

from corejax.types.config import ModelConfig
from corejax.models.layers import LayerAt, Params, gated_mlp, rms_norm
from corejax.models.llama import attention_block


def block(layer: Params, x: jax.Array, positions: jax.Array, cache: Any, at: LayerAt,
          cfg: ModelConfig) -> tuple[jax.Array, Any]:
    """x [B, T, D]: x + post_norm(attn(pre_norm(x))), then x + post_norm(mlp(pre_norm(x))). Local (sliding
    window) and global layers differ only in at.window and at.inv_freq: per-layer data, not program structure."""
    h, cache = attention_block(layer, rms_norm(x, layer["attn_norm"], cfg.norm_eps), positions, cache, at, cfg,
                               q_norm=layer["q_norm"], k_norm=layer["k_norm"])
    x = x + rms_norm(h, layer["post_attn_norm"], cfg.norm_eps)
    h = gated_mlp(rms_norm(x, layer["ffn_norm"], cfg.norm_eps), layer, cfg.activation)
    return x + rms_norm(h, layer["post_ffn_norm"], cfg.norm_eps), cache
