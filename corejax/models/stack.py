"""A decoder's layers stacked along a leading layer axis, so the layer loop is a loop in the program.

`stack_layers` turns params["layers"] (a list of per-layer dicts) into a `StackedLayers`: each parameter key
becomes one array (or QuantArray / BlockedWeight) with a leading layer axis. Layers whose weights differ in
layout — a Q4_K_M file keeps some layers' w_down in Q6_K — are stacked in groups of one layout, and a layer reads
its group through `lax.switch`. models/layers.py `run_layers` then runs one compiled layer in a `fori_loop`:
the program's size and compile time no longer grow with the layer count.

The matmul kernels (through models/layers.py `dense`) take the whole stack and the layer index and read that layer in place (kernels/
quant_matmul.cc, kernels/small_matmul.cc): slicing a layer out in XLA copies it, every layer of every step
(a lax.scan over stacked weights decoded several times slower for that reason; docs/MEASUREMENTS.md).
Per-layer vectors (norm scales) are small and are sliced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from corejax.hostmem import aligned_empty, to_device
from corejax.kernels.small_matmul import BlockedWeight
from corejax.weights.arena import adopt, device_empty
from corejax.weights.quant import QuantArray

Matrix = (QuantArray, BlockedWeight)


@struct.dataclass
class StackedLayers:
    """groups[key]: the stacked arrays of one parameter key, one per layout group (most keys: one group of all
    layers). slots[key][i] = (group, index in group) of layer i — static, part of the jit key."""

    groups: dict[str, tuple[Any, ...]]
    slots: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = struct.field(pytree_node=False)

    @property
    def num_layers(self) -> int:
        return len(self.slots[0][1])

    def layer(self, index: jax.Array | int) -> LayerView:
        return LayerView(self, index)

    def unstacked(self) -> list[dict[str, Any]]:
        """The per-layer dicts back (tests, and the unrolled reference)."""
        layers = []
        for i in range(self.num_layers):
            layer = {}
            for key, slots in self.slots:
                group, j = slots[i]
                layer[key] = jax.tree.map(lambda a, j=j: a[j], self.groups[key][group])
            layers.append(layer)
        return layers


@dataclasses.dataclass(frozen=True)
class LayerWeight:
    """Layer `index` (traced) of a stacked matrix: models/layers.py `dense` multiplies by it without copying it."""

    groups: tuple[Any, ...]
    slots: tuple[tuple[int, int], ...]
    index: jax.Array | int

    def apply(self, fn: Callable[[Any, jax.Array | int], jax.Array]) -> jax.Array:
        """fn(stacked group, index within it) for this layer's group: directly when all layers share one layout,
        else through lax.switch over the groups (Gemma's Q4_K_M: w_down in Q6_K and Q4_K)."""
        if len(self.groups) == 1:
            return fn(self.groups[0], self.index)
        group = jnp.asarray([g for g, _ in self.slots], jnp.int32)[self.index]
        within = jnp.asarray([j for _, j in self.slots], jnp.int32)[self.index]
        return lax.switch(group, [lambda j, w=w: fn(w, j) for w in self.groups], within)


class LayerView:
    """Reads like one layer's dict: matrices as LayerWeights, vectors sliced at the (traced) layer index."""

    def __init__(self, stacked: StackedLayers, index: jax.Array | int):
        self._stacked = stacked
        self._slots = dict(stacked.slots)
        self.index = index

    def __contains__(self, key: str) -> bool:
        return key in self._slots

    def __getitem__(self, key: str) -> Any:
        groups, slots = self._stacked.groups[key], self._slots[key]
        first = groups[0]
        if isinstance(first, Matrix) or first.ndim >= 3:  # [L, in, out] (or [L, E, in, out]): matrices; [L, D]: a vector
            return LayerWeight(groups, slots, self.index)
        if len(groups) != 1:
            raise ValueError(f"layer parameter {key!r} has per-layer shapes that differ; only matrices may")
        return lax.dynamic_index_in_dim(first, self.index, keepdims=False)


def _signature(v: Any) -> tuple:
    """What must match for two layers' values to share one stacked array."""
    leaves = tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(v))
    if isinstance(v, QuantArray):
        return ("quant", v.shape, v.block, v.bits, v.offset, v.fmt, v.mins is None, leaves)
    return (type(v).__name__, leaves)


def stack_values(values: list[Any], free: bool) -> Any:
    """One stacked value from same-layout values, built in host memory (no compile per shape); with `free`, each
    source array is deleted once copied, so stacking never holds two copies of more than one key."""
    leaves = [jax.tree.leaves(v) for v in values]
    out = []
    for parts in zip(*leaves, strict=True):
        whole = adopt(list(parts))  # the loader wrote these layers into one stacked array already
        if whole is not None:
            out.append(whole)
            continue
        shape, dtype = (len(parts), *parts[0].shape), parts[0].dtype
        made = device_empty(shape, dtype)  # filled in place: one copy of each layer, no host-sized temporary
        dst, host = made if made is not None else (None, aligned_empty(shape, dtype))
        for i, a in enumerate(parts):
            host[i] = np.asarray(a)
            if free and isinstance(a, jax.Array):
                a.delete()
        out.append(dst if dst is not None else to_device(host))
        del host
    stacked = jax.tree.unflatten(jax.tree.structure(values[0]), out)
    if isinstance(stacked, QuantArray):
        stacked = dataclasses.replace(stacked, code_max=max(v.code_max for v in values))
    return stacked


def stack_layers(params: dict, free: bool = False) -> dict:
    """params with "layers" as a StackedLayers (unchanged if it already is one). With `free`, the per-layer
    arrays are deleted as they are copied: only for params nobody else holds (Runtime's own)."""
    layers = params["layers"]
    if isinstance(layers, StackedLayers):
        return params
    groups, slots = {}, []
    for key in layers[0]:
        signatures: dict[tuple, list[int]] = {}
        for i, layer in enumerate(layers):
            signatures.setdefault(_signature(layer[key]), []).append(i)
        members = list(signatures.values())
        where = {i: (g, j) for g, idx in enumerate(members) for j, i in enumerate(idx)}
        groups[key] = tuple(stack_values([layers[i][key] for i in idx], free) for idx in members)
        slots.append((key, tuple(where[i] for i in range(len(layers)))))
    return dict(params, layers=StackedLayers(groups=groups, slots=tuple(slots)))
