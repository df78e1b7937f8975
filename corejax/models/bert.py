"""BERT-family encoder as pure functions: `encode(params, tokens, lengths, cfg) -> hidden`, pooling, the head.

MPNet is the same post-norm block with three differences, all EncoderConfig data: no token types, positions
numbered from padding_idx + 1 (fairseq's make_positions), and a relative position bias on every layer's
attention scores (T5's bidirectional log buckets, one [buckets, N] table all layers share).

Params (laid out by corejax/loading/encoder.py; matrices [in, out]):
  embed [V, D], embed_positions [P, D], embed_types [type_vocab_size, D] (absent when 0),
  embed_norm {scale, bias} [D]; relative_bias [buckets, N] (relative_buckets > 0 only);
  layers[i]: wqkv [D, 3D] and bqkv [3D] (query, key, value side by side), wo [D, D], bo [D];
             attn_norm {scale, bias}; w_in [D, F], b_in [F];
             w_out [F, D], b_out [D]; ffn_norm {scale, bias};
  head (classification checkpoints only): pooler_w [D, D], pooler_b [D], classifier_w [D, L], classifier_b [L].
The four layer matrices are float32 or (weights="f16") float16, column-blocked when the native kernels are
loaded (Runtime); a layer is then five native calls: the fused projection, encoder attention, and three
matmuls with their bias/GELU or residual/LayerNorm epilogues (dense_act, attention, dense_add_norm).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from corejax.types.config import EncoderConfig
from corejax.kernels.policy import current
from corejax.kernels.flash_attention import flash_attention
from corejax.kernels.encoder_attention import encoder_attention
from corejax.kernels.small_matmul import BlockedWeight, fused_matmul_add_norm, fused_matmul_bias_act
from corejax.models.layers import dense

Params = dict[str, Any]


def layer_norm(x: jax.Array, p: dict[str, jax.Array], eps: float) -> jax.Array:
    """x [..., D] normalised over D in float32 (mean and variance, as BERT's LayerNorm)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _act(x: jax.Array, kind: str) -> jax.Array:
    if kind == "none":
        return x
    if kind == "relu":
        return jax.nn.relu(x)
    return jax.nn.gelu(x, approximate=kind == "gelu_tanh")


def _fused(w) -> bool:
    return isinstance(w, BlockedWeight) and current().native


def dense_act(x: jax.Array, w, b: jax.Array, act: str, valid: jax.Array | None = None) -> jax.Array:
    """act(x @ w + b): one native call when w is column-blocked (kernels/small_matmul.cc epilogues), XLA ops
    otherwise. Padding rows (valid False) may come back as zeros."""
    if _fused(w):
        return fused_matmul_bias_act(x, w, b, act, valid)
    return _act(dense(x, w, valid) + b, act)


def dense_add_norm(x: jax.Array, w, b: jax.Array, residual: jax.Array, norm: dict[str, jax.Array], eps: float,
                   valid: jax.Array | None = None) -> jax.Array:
    """LayerNorm(residual + x @ w + b), BERT's output blocks; fused as dense_act is."""
    if _fused(w):
        return fused_matmul_add_norm(x, w, b, residual, norm["scale"], norm["bias"], eps, valid)
    return layer_norm(residual + dense(x, w, valid) + b, norm, eps)


def relative_buckets(t: int, cfg: EncoderConfig) -> np.ndarray:
    """[T, S] int32 bucket of each (query, key) distance, as transformers' MPNetEncoder.relative_position_bucket
    (T5's bidirectional buckets: half per direction, exact below a quarter of the buckets, log-spaced up to
    relative_max_distance). Float32 logs, truncated, as torch computes them, so boundary distances agree."""
    n = np.arange(t)[:, None] - np.arange(t)[None, :]  # query - key: -(memory - context)
    half = cfg.relative_buckets // 2
    exact = half // 2
    far = np.abs(n)
    with np.errstate(divide="ignore", invalid="ignore"):  # distance 0: log -inf, never chosen
        log = np.log(far.astype(np.float32) / np.float32(exact)) / np.float32(np.log(cfg.relative_max_distance / exact))
        large = np.minimum(exact + (log * np.float32(half - exact)).astype(np.int64), half - 1)
    return ((n < 0) * half + np.where(far < exact, far, large)).astype(np.int32)


def relative_bias(table: jax.Array, t: int, cfg: EncoderConfig) -> jax.Array:
    """table [buckets, N] -> the bias [N, T, S] every layer adds to its attention scores."""
    return jnp.transpose(table[relative_buckets(t, cfg)], (2, 0, 1)).astype(jnp.float32)


def _biased_attention(qkv: jax.Array, key_positions: jax.Array, bias: jax.Array, cfg: EncoderConfig) -> jax.Array:
    """Dense softmax(q k^T / sqrt(H) + bias) v over real keys: qkv [B, T, 3D], bias [N, T, S] -> [B, T, D]."""
    b, t, _ = qkv.shape
    qkv = qkv.reshape(b, t, 3, cfg.num_heads, cfg.head_dim).astype(jnp.float32)
    s = jnp.einsum("btnh,bsnh->bnts", qkv[:, :, 0], qkv[:, :, 1]) * cfg.head_dim ** -0.5 + bias
    s = jnp.where((key_positions >= 0)[:, None, None, :], s, -jnp.inf)  # a real query always sees itself
    a = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), qkv[:, :, 2])
    return a.reshape(b, t, cfg.hidden_size)


def attention(qkv: jax.Array, lengths: jax.Array, positions: jax.Array, key_positions: jax.Array,
              cfg: EncoderConfig, bias: jax.Array | None = None) -> jax.Array:
    """qkv [B, T, 3D] (the fused projection) -> [B, T, D]: bidirectional over each sequence's real tokens.
    The native kernel reads q, k, v in place (kernels/encoder_attention.cc); otherwise the tiled flash kernel,
    non-causal, where padding keys carry position -1 and are never visible. Padding query rows are unread.
    With a relative bias [N, T, S] (MPNet), which neither kernel adds, a dense XLA softmax."""
    b, t, _ = qkv.shape
    if bias is not None:
        return _biased_attention(qkv, key_positions, bias, cfg)
    kernels = current()
    if kernels.native:
        return encoder_attention(qkv, lengths, cfg.num_heads)
    qkv = qkv.reshape(b, t, 3, cfg.num_heads, cfg.head_dim)
    a = flash_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], positions, key_positions, causal=False,
                        impl=kernels.attention_impl, interpret=kernels.interpret)
    return a.reshape(b, t, cfg.hidden_size)


def _layer(p: Params, x: jax.Array, lengths: jax.Array, positions: jax.Array, key_positions: jax.Array,
           cfg: EncoderConfig, bias: jax.Array | None) -> jax.Array:
    real = key_positions >= 0  # [B, T]: padding tokens' rows may be skipped by the matmuls (garbage, unread)
    qkv = dense_act(x, p["wqkv"], p["bqkv"], "none", real)
    a = attention(qkv, lengths, positions, key_positions, cfg, bias)
    x = dense_add_norm(a, p["wo"], p["bo"], x, p["attn_norm"], cfg.norm_eps, real)
    f = dense_act(x, p["w_in"], p["b_in"], cfg.activation, real)
    return dense_add_norm(f, p["w_out"], p["b_out"], x, p["ffn_norm"], cfg.norm_eps, real)


def encode(params: Params, tokens: jax.Array, lengths: jax.Array, cfg: EncoderConfig) -> jax.Array:
    """tokens [B, T] int32 right-padded, lengths [B] -> last hidden states [B, T, D] (padding rows: garbage).

    Token type 0 everywhere: single-sentence inputs, as sentence-transformers feeds them."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    key_positions = jnp.where(positions < lengths[:, None], positions, -1)
    pad = cfg.position_padding_idx
    if pad is None:
        x = params["embed"][tokens] + params["embed_positions"][:t]
    else:  # fairseq's make_positions, as transformers' MPNetEmbeddings: pad-id tokens keep row `pad`
        counted = tokens != pad
        x = params["embed"][tokens] + params["embed_positions"][jnp.where(counted, jnp.cumsum(counted, 1) + pad, pad)]
    if cfg.type_vocab_size:
        x = x + params["embed_types"][0]
    x = layer_norm(x, params["embed_norm"], cfg.norm_eps)
    bias = relative_bias(params["relative_bias"], t, cfg) if cfg.relative_buckets else None
    for p in params["layers"]:
        x = _layer(p, x, lengths, positions, key_positions, cfg, bias)
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
