"""Opens a model in the worker: the kernel policy for this process, the memory budget checked from the file's
headers before anything is allocated, the weights loaded, and the runtime of the model's kind (a Generator for a
decoder, an EncoderRuntime for an encoder)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from corejax import native
from corejax.engine import distributed
from corejax.errors import UnsupportedModelError
from corejax.hub import ModelSource
from corejax.kernels.policy import Kernels
from corejax.loading import weights_cache as weights_cache_file
from corejax.loading.gguf import reuse_headers
from corejax.loading.loader import cache_plan, default_weights, load_model, plan_weights
from corejax.types.config import EncoderConfig, EngineConfig
from corejax.types.filter import Blocklist
from corejax.worker import memory
from corejax.worker.encoder import EncoderRuntime
from corejax.worker.generator import Generator
from corejax.worker.runtime import Runtime, enable_compilation_cache


def open_runtime(source: ModelSource, *, weights: str | None = None, engine: EngineConfig | None = None,
                 progress: bool | Callable[[str, int, int], None] = True, memory_limit: int | str | None = None,
                 output_filter: Blocklist | None = None, weights_cache: Any = "default") -> Runtime:
    """The runtime serving `source`. weights: see Session; engine: the KV cache and batching settings;
    memory_limit: bytes the worker may use (MemoryBudgetError before anything big is allocated if they do not
    fit); output_filter: a Blocklist checked on generated text; weights_cache: see loader.load_model."""
    engine = engine or EngineConfig()
    if distributed.joined() is not None and engine.devices == 1:  # a cluster's model spans all its devices
        import jax

        engine = dataclasses.replace(engine, devices=jax.device_count())
    native.cap_xla_isa()  # in-process: effective if JAX's backend has not started yet (the worker's main does it)
    kernels = Kernels.detect(engine.devices)  # once per worker: a static argument of every program after this
    enable_compilation_cache()
    # Weights, KV pool and workspace are reserved from the file's headers before any is allocated, so a
    # model that cannot fit memory_limit fails here with MemoryBudgetError, having allocated nothing.
    budget = memory.MemoryBudget(memory_limit)
    with reuse_headers():  # one parse of the file's header for the four reads below
        weights = weights or default_weights(source, kernels)
        cache = cache_plan(source, weights_cache) if weights == "native" and source.format == "gguf" else None
        plan = plan_weights(source, weights)
        if weights_cache_file.probe(cache, source.path):  # mapped: file-backed pages, no repacking transient
            plan = dataclasses.replace(plan, loading_bytes=0, mapped=True)
        engine = memory.admit(budget, plan, engine, source.name, kernels.native)
        model = load_model(source, weights=weights, progress=progress, weights_cache=cache)
    memory.loaded(budget, model.info["weight_bytes"])
    memory.reserve_serving(budget)  # the KV pool and workspace admit() planned
    if isinstance(model.cfg, EncoderConfig):
        if distributed.joined() is not None:
            raise UnsupportedModelError("several processes serve generative models only; run an encoder "
                                        "(embeddings, classification) in one process")
        return EncoderRuntime(source, model, budget, kernels)
    return Generator(source, model, budget, kernels, engine, output_filter)
