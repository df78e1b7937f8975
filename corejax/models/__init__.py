"""Model architectures as pure functions: `forward(params, tokens, positions, cache, cfg) -> (hidden, cache)`."""

from __future__ import annotations

from typing import Any

import jax

from corejax.models import decoder
from corejax.models.layers import Params, embed, lm_head, run_layers
from corejax.types.config import ModelConfig


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: Any,
            cfg: ModelConfig) -> tuple[jax.Array, Any]:
    """tokens [B, T] int32 at positions [B, T] -> final-normed hidden states [B, T, D] and the updated cache.

    The LM head is separate (`lm_head`) so prefill computes logits for the last token only."""
    x = embed(params, tokens, cfg)
    return run_layers(params, x, positions, cache, cfg, decoder.block)


__all__ = ["forward", "lm_head"]
