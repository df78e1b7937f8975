"""Where the model lives, what its two kinds share: the loaded model and its tokenizer, the memory budget, the
kernel policy, and the requests a kind cannot serve, refused with a sentence that says what to use instead. The
kinds: a decoder's Generator (worker/generator.py) and an encoder's EncoderRuntime (worker/encoder.py);
worker/start.py opens the one a model file holds, and the worker loop (worker/main.py) calls either the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from corejax.errors import InvalidParameterError, UnsupportedModelError
from corejax.hub import ModelSource
from corejax.kernels import ffi
from corejax.kernels.policy import Kernels
from corejax.loading.loader import LoadedModel
from corejax.paths import cache_dir
from corejax.types.options import SamplingParams
from corejax.types.results import Chunk
from corejax.worker import memory


def enable_compilation_cache() -> None:
    """XLA programs persist under the corejax cache, so a second start skips the first compile. One folder per
    native-kernel build (ffi.library_key): a cached program calls the kernels by name, so a program compiled
    against one build must never run against another."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla" / ffi.library_key()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class Runtime:
    """One loaded model in the worker. Subclasses serve what their kind does; the rest is refused here."""

    follower = False  # one process of a cluster that runs the leader's steps (a Generator of such a process)

    def __init__(self, source: ModelSource, model: LoadedModel, budget: memory.MemoryBudget, kernels: Kernels):
        self.source, self.model, self.budget, self.kernels = source, model, budget, kernels
        self.tokenizer = model.tokenizer

    @property
    def name(self) -> str:
        return str(self.model.info.get("name") or self.source.name)

    def info(self) -> dict[str, Any]:
        return dict(self.model.info, load_seconds=self.model.load_seconds, memory=self.budget.report(),
                    native_kernels=self.kernels.native, kernel_isa=self.kernels.isa, resident=memory.resident())

    def warmup(self, report: Any = None, batches: bool = False) -> None:
        """Compiles what a first request runs (a Generator does; nothing to do here)."""

    def cancel(self, tag: Any) -> None:
        """Cancels the generation started with stream(..., tag=tag) (a Generator has some)."""

    def stream(self, prompt: str | None, messages: Sequence[dict] | None, sp: SamplingParams,
               speculative: Any = None, tag: Any = None, tools: list[dict] | None = None) -> Iterator[Chunk]:
        raise UnsupportedModelError(
            f"{self.name} is an encoder: it embeds and classifies but cannot generate text; use embed()/classify(), "
            "or a generative model for generate()")

    def embed(self, texts: list[str], truncate: bool = True) -> np.ndarray:
        raise UnsupportedModelError(
            f"{self.name} is a generative model; embed() needs an encoder such as all-minilm-l6-v2 "
            "(corejax.embed(texts, model='all-minilm-l6-v2'))")

    def classify(self, texts: list[str], labels: list[str] | None, head: Any = None, multi_label: bool | None = None,
                 template: str | None = None, truncate: bool = True) -> tuple[list[str], np.ndarray]:
        raise InvalidParameterError(f"{self.name} cannot classify")
