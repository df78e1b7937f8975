"""Tensor parallelism over a `jax.sharding.Mesh`: one model's weights and KV pages split over N devices, the
programs unchanged.

The engine's jitted programs (corejax/engine/programs.py) are written for one device; given arrays laid out over a mesh
with one axis, "tp", XLA's SPMD partitioner (GSPMD) splits each program and inserts the collectives. What is
split (Megatron's layout):
  * attention: q/k/v projections by output column (= by head), the output projection by input row, the KV
    pages by KV head — when the head counts divide by N; otherwise attention stays replicated;
  * MLP: gate/up projections by column, the down projection by row (one all-reduce per layer);
  * LM head: by vocabulary entry (logits gathered for the sampler).
Norm scales and anything small stay replicated. The scheduler, the sampler and the host side see ordinary
arrays. Sharding needs float weights (float32, or bfloat16 on a GPU): quantized weights and corejax's native CPU
kernels are single-device (kernels/ffi.py turns them off when the process has more than one device).

On a CPU, N host devices come from `XLA_FLAGS=--xla_force_host_platform_device_count=N` (set before JAX starts):
the figures then show the layout works, not a speed-up; on GPUs each device is a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from corejax.types.config import ModelConfig
from corejax.errors import InvalidParameterError
from corejax.models.stack import StackedLayers

AXIS = "tp"


def make_mesh(devices: int) -> Mesh:
    """A one-axis mesh over the first `devices` devices (InvalidParameterError when there are fewer)."""
    have = jax.devices()
    if devices > len(have):
        hint = (" (on a CPU, start Python with XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{devices})" if have[0].platform == "cpu" else "")
        raise InvalidParameterError(f"devices={devices} but JAX sees {len(have)} device(s){hint}")
    return Mesh(np.array(have[:devices]), (AXIS,))


def _specs(cfg: ModelConfig, n: int) -> dict[str, P]:
    """PartitionSpec of each stacked layer key [L, in, out] (keys absent here stay replicated)."""
    heads = cfg.num_heads % n == 0
    kv = cfg.num_kv_heads % n == 0 and heads
    cols, rows, vector = P(None, None, AXIS), P(None, AXIS, None), P(None, AXIS)
    specs = {"w_gate": cols, "w_up": cols, "w_down": rows}
    if heads:  # a projection's bias (Qwen2) and whole-projection norm (OLMo 2) split with its columns
        specs.update(wq=cols, wo=rows, bq=vector)
    if kv:
        specs.update(wk=cols, wv=cols, bk=vector, bv=vector)
    return specs


def kv_spec(cfg: ModelConfig, n: int) -> P:
    """The KV pages [L, K, P, page_size, H] split by KV head when the heads divide by n, else replicated."""
    return P(None, AXIS) if cfg.num_kv_heads % n == 0 and cfg.num_heads % n == 0 else P()


def shard_decoder(params: dict[str, Any], cfg: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """The decoder's params (layers stacked: models/stack.py) placed over the mesh."""
    n = mesh.devices.size
    put = functools.partial(_put, mesh)
    replicate = lambda tree: jax.tree.map(lambda x: put(x, P()), tree)  # noqa: E731
    layers = params["layers"]
    if not isinstance(layers, StackedLayers):
        raise InvalidParameterError("sharding needs the engine's stacked layers")
    specs = _specs(cfg, n)
    groups = {}
    for key, group in layers.groups.items():
        if any(not isinstance(a, jax.Array | np.ndarray) for a in group):
            raise InvalidParameterError(
                f"layer weight {key!r} is quantized; a model sharded over devices needs float weights "
                "(weights='f32', or 'bf16' on a GPU)")
        groups[key] = tuple(put(a, specs.get(key, P())) for a in group)
    out = {k: replicate(v) for k, v in params.items() if k not in ("layers", "lm_head", "embed")}
    out["layers"] = StackedLayers(groups, layers.slots)
    for key in ("lm_head", "embed"):  # [V, D] or [D, V]: split the vocabulary axis when it divides
        if key in params:
            w = params[key]
            axis = int(np.argmax(w.shape)) if w.ndim == 2 else None
            spec = P(*[AXIS if i == axis else None for i in range(w.ndim)]) if axis is not None and \
                w.shape[axis] % n == 0 else P()
            out[key] = put(w, spec)
    return out


def _put(mesh: Mesh, x: Any, spec: P) -> jax.Array:
    """x (the whole array, on the host or this process's device) laid out over the mesh. Over several processes
    each makes only the shards its own devices hold, from its own copy (every process loaded the same file)."""
    sharding = NamedSharding(mesh, spec)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def bytes_per_device(tree: Any) -> int:
    """Bytes of `tree`'s arrays held by the first device (a replicated array counts in full)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shards = getattr(leaf, "addressable_shards", None)
        total += shards[0].data.nbytes if shards else np.asarray(leaf).nbytes
    return total
