"""corejax: a sandboxed, GPU-optional LLM inference runtime on JAX.

Public API (everything else is internal):
    generate(prompt, model=None, **sampling) -> str       stream(...) -> iterator of str
    embed(texts, model="all-minilm-l6-v2") -> np.ndarray  classify(texts, model=None, labels=...) -> Classification
    Session(model) -> .generate() -> GenerationResult, .stream(), .info()
    pull(name), list_models(), SamplingParams, SpeculativeConfig, Blocklist (Session(output_filter=...)),
    Cluster (Session(cluster=...)), and the exceptions below.

The layout draws the two processes: client/ is the caller's side (never imports JAX), worker/ holds the model in
the sandboxed subprocess, wire/ is what crosses between them, types/ the plain data both sides share;
serving/ schedules requests in the worker and engine/ holds the compiled programs (docs/ARCHITECTURE.md).
"""

from corejax import paths as _paths

_paths.map_source_tree_kernels()  # run from a source tree, corejax.kernels is the top-level kernels/ folder

from corejax.api import DEFAULT_EMBEDDING_MODEL, classify, embed, generate, stream
from corejax.types.options import SamplingParams, SpeculativeConfig
from corejax.errors import (
    CacheFullError,
    ContextLengthError,
    CorejaxError,
    InvalidParameterError,
    MemoryBudgetError,
    ModelFormatError,
    ModelNotFoundError,
    PullError,
    RequestTimeout,
    SandboxError,
    UnsupportedModelError,
    WorkerCrashed,
)
from corejax.types.cluster import Cluster
from corejax.types.filter import Blocklist
from corejax.hub import DEFAULT_MODEL, list_models, pull
from corejax.types.results import Classification, GenerationResult, Timings, TokenLogprob
from corejax.client.session import Session
from corejax.version import __version__

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "DEFAULT_MODEL",
    "Blocklist",
    "Classification",
    "Cluster",
    "ContextLengthError",
    "CacheFullError",
    "CorejaxError",
    "GenerationResult",
    "InvalidParameterError",
    "MemoryBudgetError",
    "ModelFormatError",
    "ModelNotFoundError",
    "PullError",
    "RequestTimeout",
    "SandboxError",
    "SamplingParams",
    "SpeculativeConfig",
    "Session",
    "Timings",
    "TokenLogprob",
    "UnsupportedModelError",
    "WorkerCrashed",
    "__version__",
    "classify",
    "embed",
    "generate",
    "list_models",
    "pull",
    "stream",
]
