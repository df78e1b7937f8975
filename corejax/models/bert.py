"""BERT-family encoder as pure functions: `encode(params, tokens, lengths, cfg) -> hidden`, pooling, the head.

Params (laid out by corejax/loading/encoder.py; matrices [in, out]):
  embed [V, D], embed_positions [P, D], embed_types [2, D], embed_norm {scale, bias} [D];
  layers[i]: wqkv [D, 3D] and bqkv [3D] (query, key, value side by side), wo [D, D], bo [D];
             attn_norm {scale, bias}; w_in [D, F], b_in [F];
             w_out [F, D], b_out [D]; ffn_norm {scale, bias};
  head (classification checkpoints only): pooler_w [D, D], pooler_b [D], classifier_w [D, L], classifier_b [L].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from corejax.config import EncoderConfig
from corejax.kernels import flash_attention
from corejax.models.layers import dense

Params = dict[str, Any]


def layer_norm(x: jax.Array, p: dict[str, jax.Array], eps: float) -> jax.Array:
    """x [..., D] normalised over D in float32 (mean and variance, as BERT's LayerNorm)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _act(x: jax.Array, kind: str) -> jax.Array:
    if kind == "relu":
        return jax.nn.relu(x)
    return jax.nn.gelu(x, approximate=kind == "gelu_tanh")


def _layer(p: Params, x: jax.Array, positions: jax.Array, key_positions: jax.Array, cfg: EncoderConfig) -> jax.Array:
    b, t, d = x.shape
    n, h = cfg.num_heads, cfg.head_dim
    real = key_positions >= 0  # [B, T]: padding tokens' rows may be skipped by the matmuls (garbage, unread)
    qkv = (dense(x, p["wqkv"], real) + p["bqkv"]).reshape(b, t, 3, n, h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, N, H] each
    # Non-causal: padding keys carry position -1 and are never visible; padding query rows are ignored later.
    a = flash_attention(q, k, v, positions, key_positions, causal=False)
    x = layer_norm(x + dense(a.reshape(b, t, d), p["wo"], real) + p["bo"], p["attn_norm"], cfg.norm_eps)
    f = _act(dense(x, p["w_in"], real) + p["b_in"], cfg.activation)
    return layer_norm(x + dense(f, p["w_out"], real) + p["b_out"], p["ffn_norm"], cfg.norm_eps)


def encode(params: Params, tokens: jax.Array, lengths: jax.Array, cfg: EncoderConfig) -> jax.Array:
    """tokens [B, T] int32 right-padded, lengths [B] -> last hidden states [B, T, D] (padding rows: garbage).

    Token type 0 everywhere: single-sentence inputs, as sentence-transformers feeds them."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    key_positions = jnp.where(positions < lengths[:, None], positions, -1)
    x = params["embed"][tokens] + params["embed_positions"][:t] + params["embed_types"][0]
    x = layer_norm(x, params["embed_norm"], cfg.norm_eps)
    for p in params["layers"]:
        x = _layer(p, x, positions, key_positions, cfg)
    return x


def pool(hidden: jax.Array, lengths: jax.Array, mode: str) -> jax.Array:
    """hidden [B, T, D], lengths [B] -> [B, D]: "mean" over real tokens, "cls" (token 0) or "max"."""
    mask = (jnp.arange(hidden.shape[1])[None, :] < lengths[:, None])[..., None]  # [B, T, 1]
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return jnp.where(mask, hidden, -1e9).max(1)
    if mode == "mean":
        total = jnp.where(mask, hidden, 0.0).sum(1)
        return total / jnp.maximum(mask.sum(1), 1e-9)  # sentence-transformers clamps the count at 1e-9
    raise ValueError(f"{mode=} must be 'mean', 'cls' or 'max'")


def l2_normalize(x: jax.Array) -> jax.Array:
    """x [B, D] / max(||x||, 1e-12), as torch.nn.functional.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def classifier_logits(params: Params, hidden: jax.Array) -> jax.Array:
    """hidden [B, T, D] -> logits [B, L] of a BertForSequenceClassification head (tanh pooler over [CLS])."""
    head = params["head"]
    pooled = jnp.tanh(dense(hidden[:, 0], head["pooler_w"]) + head["pooler_b"])
    return dense(pooled, head["classifier_w"]) + head["classifier_b"]
