"""One entry point from a resolved model source (GGUF file or HF folder) to config, params and tokenizer."""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path
from typing import Any

from corejax.config import ModelConfig
from corejax.errors import InvalidParameterError, ModelFormatError
from corejax.hub import ModelSource
from corejax.config import WEIGHT_MODES
from corejax.loading.convert import load_gguf_params, load_hf_folder
from corejax.loading.gguf import read_gguf


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    info: dict[str, Any]
    load_seconds: float
    sentence: Any = None  # encoders: loading.encoder.SentenceConfig (pooling, normalization, max length)


def describe_gguf(path: Path) -> dict[str, Any]:
    """Architecture, sizes and tensor types of a GGUF file, read from its header only (`corejax info`)."""
    with read_gguf(path) as f:
        types = collections.Counter(t.ggml_type.name for t in f.tensors.values())
        type_bytes = collections.Counter()
        for t in f.tensors.values():
            type_bytes[t.ggml_type.name] += t.nbytes
        params = sum(_numel(t.shape) for t in f.tensors.values())
        meta = {k: v for k, v in f.metadata.items()
                if isinstance(v, (str, int, float, bool)) and k != "tokenizer.chat_template"}
        return {
            "path": str(path),
            "format": "gguf",
            "gguf_version": f.version,
            "architecture": f.architecture,
            "name": f.metadata.get("general.name"),
            "file_bytes": path.stat().st_size,
            "parameters": params,
            "tensor_count": len(f.tensors),
            "tensor_types": dict(types),
            "tensor_type_bytes": dict(type_bytes),
            "has_chat_template": "tokenizer.chat_template" in f.metadata,
            "metadata": meta,
        }


def param_bytes(params: Any) -> int:
    """Bytes the loaded weights occupy in memory (codes + scales for quantized ones)."""
    import jax

    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def load_model(source: ModelSource, *, weights: str | None = None, progress: bool = True) -> LoadedModel:
    """Reads a model completely: the only place corejax touches model files (inside the worker).

    weights: "f32" (the default: everything dequantized at load — the fastest on XLA:CPU today, see
    corejax/quant.py), "native" (GGUF only: quantized tensors stay quantized, ~file-size memory),
    "int8" / "int4" (quantize float matrices at load)."""
    weights = weights or "f32"
    if weights not in WEIGHT_MODES or (source.format == "hf" and weights == "native"):
        raise InvalidParameterError(
            f"weights must be one of {', '.join(WEIGHT_MODES)} (native only for GGUF); got {weights!r}")
    start = time.perf_counter()
    sentence = None
    if source.format == "gguf":
        from corejax.tokenizer import tokenizer_from_gguf_metadata

        with read_gguf(source.path) as f:
            cfg = ModelConfig.from_gguf(f.metadata, tie_embeddings="output.weight" not in f.tensors)
            tokenizer = tokenizer_from_gguf_metadata(f.metadata)
            params = load_gguf_params(f, cfg, weights=weights, progress=progress)
        info = describe_gguf(source.path)
    elif source.format == "hf" and _is_encoder_folder(source.path):
        from corejax.loading.encoder import load_encoder_folder, read_hf_config, read_sentence_config
        from corejax.tokenizer import tokenizer_from_files

        if weights != "f32":
            raise InvalidParameterError(f"encoder models load as f32 only; got weights={weights!r}")
        raw = read_hf_config(source.path)
        cfg, params = load_encoder_folder(source.path, raw)
        tokenizer = tokenizer_from_files(source.path)
        sentence = read_sentence_config(source.path, cfg, None)
        info = {"path": str(source.path), "format": "hf", "architecture": cfg.arch, "task": "encoder",
                "name": raw.get("_name_or_path") or source.name, "sentence": dataclasses.asdict(sentence)}
    elif source.format == "hf":
        from corejax.tokenizer import tokenizer_from_files

        cfg, params, raw = load_hf_folder(source.path, weights=weights, progress=progress)
        tokenizer = tokenizer_from_files(source.path)
        info = {"path": str(source.path), "format": "hf", "architecture": cfg.arch,
                "name": raw.get("_name_or_path") or source.name}
    else:
        raise ModelFormatError(f"unknown model format {source.format!r} for {source.path}")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ModelFormatError(
            f"{source.path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{cfg.vocab_size} embedding rows"
        )
    info["config"] = dataclasses.asdict(cfg)
    info["weights"] = weights
    info["weight_bytes"] = param_bytes(params)
    return LoadedModel(cfg, params, tokenizer, info, time.perf_counter() - start, sentence)


def _is_encoder_folder(folder: Path) -> bool:
    from corejax.config import is_encoder_config
    from corejax.loading.encoder import read_hf_config

    return is_encoder_config(read_hf_config(folder))
