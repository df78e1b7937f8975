"""KV caches as pytrees with one method the models call: write this step's keys/values, then attend.

The models never index the cache themselves: `cache.attend(...)` is the seam where the dense reference
cache (here) and the paged cache with its flash/paged kernels plug in, so both serve the same forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from corejax.config import ModelConfig

_MASKED = -1e30  # large but finite: a fully masked padding row must stay NaN-free


@struct.dataclass
class DenseKVCache:
    """One contiguous [max_len] slot per batch row. Position p of row b lives at index p.

    k, v: [num_layers, batch, max_len, num_kv_heads, head_dim]
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> DenseKVCache:
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def attend(
        self,
        layer: int,
        q: jax.Array,  # [B, T, N, H], already rotated
        k: jax.Array,  # [B, T, K, H], already rotated
        v: jax.Array,  # [B, T, K, H]
        positions: jax.Array,  # [B, T] absolute positions of these tokens
        *,
        window: int,
        scale: float,
        softcap: float,
    ) -> tuple[jax.Array, DenseKVCache]:
        """Stores k/v at their positions in layer `layer`, then attends q to everything stored -> [B, T, N, H]."""
        rows = jnp.arange(q.shape[0])[:, None]  # [B, 1]
        new_k = self.k.at[layer, rows, positions].set(k.astype(self.k.dtype), mode="drop")
        new_v = self.v.at[layer, rows, positions].set(v.astype(self.v.dtype), mode="drop")
        key_positions = jnp.broadcast_to(jnp.arange(self.max_len), (q.shape[0], self.max_len))
        out = dense_attention(
            q, new_k[layer], new_v[layer], positions, key_positions, window=window, scale=scale, softcap=softcap
        )
        return out, DenseKVCache(k=new_k, v=new_v)


def dense_attention(
    q: jax.Array,  # [B, T, N, H]
    k: jax.Array,  # [B, S, K, H]
    v: jax.Array,  # [B, S, K, H]
    q_positions: jax.Array,  # [B, T]
    k_positions: jax.Array,  # [B, S]; a key is visible if 0 <= position <= the query's (and inside the window)
    *,
    window: int,
    scale: float,
    softcap: float,
) -> jax.Array:
    """Causal (optionally sliding-window, soft-capped) GQA attention with an explicit [T, S] score matrix.

    The reference the tiled kernels are checked against. Keys at positions the query cannot see — later
    tokens, stale slots past the current length, slots outside the window — are masked by position, so a
    cache slot written by prompt padding is never read before a real token overwrites it."""
    batch, t, n, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(batch, t, kv_heads, n // kv_heads, h).astype(jnp.float32)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32)) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    qp = q_positions[:, None, None, :, None]  # [B, 1, 1, T, 1]
    kp = k_positions[:, None, None, None, :]  # [B, 1, 1, 1, S]
    visible = (kp <= qp) & (kp >= 0)
    if window:
        visible &= qp - kp < window
    scores = jnp.where(visible, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(jnp.float32))
    return out.reshape(batch, t, n, h)
