"""An encoder's runtime in the worker: sentence embeddings and classification (its own head, or a linear head
over its embeddings), batched through its EncoderRunner (corejax/serving/encode.py has the batching)."""

from __future__ import annotations

from typing import Any

import numpy as np

from corejax.errors import InvalidParameterError
from corejax.hub import ModelSource
from corejax.kernels.policy import Kernels
from corejax.loading.loader import ENCODER_MATRICES, LoadedModel, block_params
from corejax.serving.encode import Encoder
from corejax.worker import memory
from corejax.worker.runtime import Runtime


class EncoderRuntime(Runtime):
    def __init__(self, source: ModelSource, model: LoadedModel, budget: memory.MemoryBudget, kernels: Kernels):
        super().__init__(source, model, budget, kernels)
        if model.cfg.decoder is not None:  # a decoder's block run bidirectionally (EmbeddingGemma): as a Generator's
            from corejax.worker.generator import prepare_decoder

            model.params = prepare_decoder(model.params, kernels)
        elif kernels.native:  # float matmuls on the native kernel, padding tokens skipped (kernels/small_matmul.cc)
            model.params = block_params(model.params, kernels, ENCODER_MATRICES)
        self.encoder = Encoder(model.cfg, model.params, self.tokenizer, model.sentence, kernels)

    def embed(self, texts: list[str], truncate: bool = True) -> np.ndarray:
        """[n, D] float32 sentence embeddings (pooling and normalization from the model's modules.json)."""
        return self.encoder.embed(texts, truncate)

    def classify(self, texts: list[str], labels: list[str] | None, head: Any = None, multi_label: bool | None = None,
                 template: str | None = None, truncate: bool = True) -> tuple[list[str], np.ndarray]:
        """-> (labels, scores [n, L]): the model's own head, or an embedding model plus head=(W, b)."""
        if template is not None:
            raise InvalidParameterError("template= is for zero-shot with a generative model; an encoder "
                                        "classifies with its own head or head=(W, b)")
        return self.encoder.classify(texts, labels, head, multi_label, truncate)
