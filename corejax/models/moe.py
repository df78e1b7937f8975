"""A mixture-of-experts MLP (Qwen3-MoE, OLMoE, Mixtral) as a pure function: a router scores the experts per
token, each token runs only its top `experts_used` experts, and their outputs are summed with the router's
weights (renormalised to sum 1 when the family does).

Tokens are grouped by expert, not experts by token: the (token, slot) rows are sorted by expert. With the
native kernels and quantized experts (a GGUF's), each of gate, up and down is then one kernel call for all rows
(kernels/quant_matmul.cc corejax_quant_matmul_experts: the activations quantized once, each routed expert's
weights read in place from the layer stack once for all its rows, experts and column groups spread over the
cores). Otherwise (float experts, XLA's fallback) the sorted rows are cut into chunks of at most `chunk` rows
of one expert and one loop over the chunks runs each chunk's expert MLP, the weights again read in place by
index. Either way a decode step of one token reads `experts_used` experts' weights and nothing is gathered or
copied per token; in the chunk loop, padding rows of a chunk (past its expert's last row) are computed and
dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from corejax.kernels import quant_matmul
from corejax.kernels.policy import current
from corejax.models.layers import activate, dense
from corejax.models.stack import LayerWeight
from corejax.types.config import ModelConfig
from corejax.weights import quant
from corejax.weights.quant import QuantArray

MAX_CHUNK = 64  # rows of one expert per kernel call (prefill); a decode step's chunks are smaller


def chunk_rows(rows: int, experts: int) -> int:
    """Rows per chunk for `rows` (token, expert) pairs over `experts` experts: about twice the mean rows per
    expert, a power of two in [1, MAX_CHUNK] (static: part of the program)."""
    mean = max(1, -(-2 * rows // experts))
    return min(MAX_CHUNK, 1 << (mean - 1).bit_length())


def _expert_matmul(x: jax.Array, w: Any, expert: jax.Array) -> jax.Array:
    """x [C, in] @ expert `expert` of w -> [C, out] float32. w: one layer's experts (a QuantArray whose arrays
    lead with the expert axis, or a float [E, in, out]), or a LayerWeight of the layer loop's stack."""
    if isinstance(w, LayerWeight):
        return w.apply(lambda stacked, layer: _stacked_matmul(x, stacked, layer, expert))
    return _stacked_matmul(x, w, None, expert)


def _stacked_matmul(x: jax.Array, w: Any, layer: jax.Array | int | None, expert: jax.Array) -> jax.Array:
    if isinstance(w, QuantArray):
        if layer is None:
            return quant.matmul(x, w, expert)
        experts = w.codes.shape[1]  # [L, E, ...] read as [L * E, ...]: a free reshape, the kernel's index
        flat = dataclasses.replace(w, **{k: None if a is None else a.reshape(-1, *a.shape[2:])
                                         for k, a in (("codes", w.codes), ("scales", w.scales), ("mins", w.mins))})
        return quant.matmul(x, flat, layer * experts + expert)
    index = (expert,) if layer is None else (layer, expert)
    matrix = lax.dynamic_slice(w, (*index, 0, 0), (*(1,) * len(index), *w.shape[-2:])).reshape(w.shape[-2:])
    return jnp.einsum("cd,de->ce", x, matrix.astype(jnp.float32), preferred_element_type=jnp.float32)


def _quantized(w: Any) -> bool:
    return isinstance(w.groups[0] if isinstance(w, LayerWeight) else w, QuantArray)


def _grouped_matmul(x: jax.Array, w: Any, counts: jax.Array) -> jax.Array:
    """x [R, in] (rows grouped by expert, counts [E]) @ each group's expert -> [R, out]: one native call."""

    def call(stacked: QuantArray, layer: jax.Array | int | None) -> jax.Array:
        y = quant_matmul.quant_matmul_experts(x, stacked.codes, stacked.scales, stacked.mins, layer, counts,
                                              bits=stacked.bits, block=stacked.block, offset=stacked.offset,
                                              code_max=stacked.code_max)
        return y[:, :stacked.shape[1]]

    if isinstance(w, LayerWeight):
        return w.apply(call)
    return call(w, None)


def route(x: jax.Array, router: Any, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """x [N, D] -> (weights [N, k] float32, experts [N, k] int32): softmax over the experts, top k, renormalised
    when cfg.expert_norm (HF's norm_topk_prob; llama.cpp's norm_w)."""
    probs = jax.nn.softmax(dense(x, router), axis=-1)
    weights, experts = lax.top_k(probs, cfg.experts_used)
    if cfg.expert_norm:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def moe_mlp(x: jax.Array, layer: Any, cfg: ModelConfig) -> jax.Array:
    """x [B, T, D] -> [B, T, D]: sum over each token's routed experts of weight * down(act(gate(x)) * up(x))."""
    batch, t, d = x.shape
    n, k, e = batch * t, cfg.experts_used, cfg.num_experts
    flat = x.reshape(n, d)
    weights, experts = route(flat, layer["router"], cfg)
    rows = n * k
    ids = experts.reshape(rows)
    order = jnp.argsort(ids, stable=True)  # (token, slot) rows grouped by expert
    counts = jnp.bincount(ids, length=e)
    sorted_rows = flat[order // k]
    if current().native and all(_quantized(layer[key]) for key in ("x_gate", "x_up", "x_down")):
        h = activate(_grouped_matmul(sorted_rows, layer["x_gate"], counts), cfg.activation)
        out = _grouped_matmul(h * _grouped_matmul(sorted_rows, layer["x_up"], counts), layer["x_down"], counts)
    else:
        out = _chunk_loop(sorted_rows, counts, layer, cfg)
    per_slot = jnp.zeros((rows, d), jnp.float32).at[order].set(out).reshape(n, k, d)
    return jnp.einsum("nk,nkd->nd", weights, per_slot).reshape(batch, t, d)


def _chunk_loop(sorted_rows: jax.Array, counts: jax.Array, layer: Any, cfg: ModelConfig) -> jax.Array:
    """The grouped rows' expert MLPs [R, D] without the grouped kernel: one loop over chunks of at most `c` rows
    of one expert, each expert's weights read by index."""
    rows, d = sorted_rows.shape
    c = chunk_rows(rows, cfg.num_experts)
    starts = jnp.cumsum(counts) - counts
    chunks = (counts + c - 1) // c
    chunk_end = jnp.cumsum(chunks)
    # The rows padded by one chunk so every chunk's slice is in bounds.
    xs = jnp.concatenate([sorted_rows, jnp.zeros((c, d), sorted_rows.dtype)])

    def body(state):
        j, out = state
        expert = jnp.searchsorted(chunk_end, j, side="right").astype(jnp.int32)
        row0 = starts[expert] + (j - (chunk_end[expert] - chunks[expert])) * c
        h = lax.dynamic_slice(xs, (row0, 0), (c, d))
        gate = _expert_matmul(h, layer["x_gate"], expert)
        up = _expert_matmul(h, layer["x_up"], expert)
        y = _expert_matmul(activate(gate, cfg.activation) * up, layer["x_down"], expert)
        mine = (jnp.arange(c) + row0) < starts[expert] + counts[expert]
        old = lax.dynamic_slice(out, (row0, 0), (c, d))
        return j + 1, lax.dynamic_update_slice(out, jnp.where(mine[:, None], y, old), (row0, 0))

    init = (jnp.int32(0), jnp.zeros((rows + c, d), jnp.float32))
    _, out = lax.while_loop(lambda s: s[0] < chunk_end[-1], body, init)
    return out[:rows]
