"""sentence-transformers' modules between pooling and normalization, as pure functions: its Dense layers
(EmbeddingGemma's 2_Dense and 3_Dense). Params (loading/encoder.py load_dense): one dict per module, w [in, out]
float32 and, when the module has one, b [out]; each module's activation is a static name of ACTIVATIONS."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from corejax.models.layers import dense

ACTIVATIONS = {
    "identity": lambda x: x,
    "tanh": jnp.tanh,  # sentence-transformers' Dense default
    "relu": jax.nn.relu,
}


def dense_modules(x: jax.Array, layers: Sequence[dict[str, Any]], activations: Sequence[str]) -> jax.Array:
    """x [B, D] (pooled) -> activation(x @ w + b) through each module in turn -> [B, D_last] float32."""
    for p, act in zip(layers, activations, strict=True):
        y = dense(x, p["w"])
        if "b" in p:
            y = y + p["b"]
        x = ACTIVATIONS[act](y)
    return x
