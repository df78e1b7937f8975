"""One entry point from a resolved model source (GGUF file or HF folder) to config, params and tokenizer."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from corejax.types.config import ENCODER_WEIGHTS, WEIGHT_MODES, EncoderConfig, ModelConfig, is_bidirectional_decoder
from corejax.errors import InvalidParameterError, ModelFormatError, UnsupportedModelError, reads_untrusted
from corejax.hub import ModelSource
from corejax.kernels.policy import Kernels
from corejax.loading.convert import ROPE_FREQS, ROPE_LONG, ROPE_SHORT, load_gguf_params, load_hf_folder
from corejax.loading.ggml_quants import UNPACKERS
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


def gguf_config(f: Any, meta: Any) -> ModelConfig:
    """The model config of an open GGUF file: its metadata, whether it ties the LM head to the embedding, and
    llama.cpp's rope_freqs tensor where the file has one (how its converter stores Llama 3.1's RoPE scaling).
    Phi-3's LongRoPE: its short factors and attention factor, the context capped at the original length (past
    it llama.cpp and transformers switch to the long factors, which corejax does not implement)."""
    short = ROPE_SHORT
    if ROPE_LONG in f.tensors and short not in f.tensors:
        raise UnsupportedModelError(f"{f.path}: this model has LongRoPE long factors ({ROPE_LONG}) without its short "
                                    "ones; corejax implements LongRoPE within the original context only, with the "
                                    "short factors, so it is refused. Re-convert it with llama.cpp's converter")
    name = ROPE_FREQS if ROPE_FREQS in f.tensors else short if short in f.tensors else None
    factors = f.dequantize(name).reshape(-1).tolist() if name else None
    cfg = ModelConfig.from_gguf(meta, tie_embeddings="output.weight" not in f.tensors, rope_factors=factors)
    if name == short:
        arch = meta["general.architecture"]
        attn = meta.get(f"{arch}.rope.scaling.attn_factor", 1.0)
        original = meta.get(f"{arch}.rope.scaling.original_context_length", cfg.max_context)
        if not isinstance(attn, (int, float)) or not isinstance(original, int) or original <= 0:
            raise ModelFormatError(f"{f.path}: bad LongRoPE metadata (attn_factor {attn!r}, original context "
                                   f"{original!r})")
        cfg = dataclasses.replace(cfg, rope_attn_factor=float(attn), max_context=min(cfg.max_context, original))
    return cfg


def param_bytes(params: Any) -> int:
    """Bytes the loaded weights occupy in memory (codes + scales for quantized ones)."""
    import jax

    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def default_weights(source: ModelSource, kernels: Kernels) -> str:
    """The weights mode when none is asked for, from what the kernel policy runs fast on this CPU: a GGUF file
    whose matrices are quantized stays quantized ("native") where the quantized matmul has a SIMD path
    (kernels.fast_quant: kernels/quant_matmul.cc on AVX-512 VNNI, AVX-VNNI, AVX2 or NEON, faster than float32 and
    ~file-size memory; its scalar reference path is slower than XLA's float dot, so not there); everything
    else loads as float32 (XLA:CPU's own float dot beats its dequantize-then-dot; corejax/weights/quant.py). An
    encoder's matrices load as bfloat16 where the kernel multiplies them natively (kernels.bf16_dot:
    AVX512_BF16), else as float16 where the native float kernel runs (loading/encoder.py says why;
    docs/MEASUREMENTS.md has the figures)."""
    if source.format == "hf" and _is_bidirectional_folder(source.path):
        return "f32"  # EmbeddingGemma: the decoder block's float32 matmuls (no 16-bit path for it yet)
    if kernels.native and source.format == "hf" and _is_encoder_folder(source.path):
        return "bf16" if kernels.bf16_dot else "f16"
    if not kernels.fast_quant or source.format != "gguf":
        return "f32"
    with read_gguf(source.path) as f:
        quantized = any(t.ggml_type in UNPACKERS and len(t.shape) == 2 for t in f.tensors.values())
    return "native" if quantized else "f32"


_DEFAULT = "default"


def cache_plan(source: ModelSource, weights_cache: Any = _DEFAULT) -> Any:
    """The weights_cache.CachePlan a load of `source` uses: the one given, or (the default) the in-process one."""
    from corejax.loading import weights_cache as wc

    return wc.default_plan(source.path) if isinstance(weights_cache, str) and weights_cache == _DEFAULT \
        else weights_cache


def load_model(source: ModelSource, *, weights: str | None = None, progress: bool = True,
               weights_cache: Any = _DEFAULT) -> LoadedModel:
    """Reads a model completely: the only place corejax touches model files (inside the worker).

    weights: "f32" (everything dequantized at load; the default here — Runtime picks default_weights),
    "native" (GGUF only: quantized tensors stay quantized, ~file-size memory, the quantized kernel's speed),
    "int8" / "int4" (quantize float matrices at load).
    weights_cache: a weights_cache.CachePlan (a sandboxed worker's, from its parent), None (off), or the
    default: the in-process cache file under the corejax cache (weights_cache.default_plan); only a GGUF loaded
    with weights="native" uses it (loading/weights_cache.py)."""
    weights = weights or "f32"
    if weights not in WEIGHT_MODES or (source.format == "hf" and weights == "native"):
        raise InvalidParameterError(
            f"weights must be one of {', '.join(WEIGHT_MODES)} (native only for GGUF); got {weights!r}")
    encoder = source.format == "hf" and _is_encoder_folder(source.path)
    if weights in ("f16", "bf16") and not encoder:
        raise InvalidParameterError(f"weights={weights!r} is for encoder (BERT-family) models; generative models take "
                                    "f32, int8, int4 or, for a quantized GGUF, native")
    start = time.perf_counter()
    sentence = None
    if source.format == "gguf":
        from corejax.tokenizer import tokenizer_from_gguf_metadata

        with read_gguf(source.path) as f:
            # Metadata arrays are views of the mapping; copies let close() unmap the file, whose pages (all of
            # them, once every tensor was read) would otherwise stay resident for the session's life.
            meta = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in f.metadata.items()}
            cfg = gguf_config(f, meta)
            tokenizer = tokenizer_from_gguf_metadata(meta)
            if weights == "native":
                params, cache_status = _native_gguf_params(f, cfg, source, progress, weights_cache)
            else:
                params = load_gguf_params(f, cfg, weights=weights, progress=progress)
                cache_status = {"status": "off", "detail": f"weights={weights!r} (only native weights are cached)"}
        info = describe_gguf(source.path)
        info["weights_cache"] = cache_status
    elif encoder:
        from corejax.loading.encoder import load_dense, load_encoder_folder, read_hf_config, read_sentence_config
        from corejax.tokenizer import tokenizer_from_files

        if weights not in ENCODER_WEIGHTS:
            raise InvalidParameterError(f"encoder models load as f32, f16 or bf16; got weights={weights!r}")
        raw = read_hf_config(source.path)
        if is_bidirectional_decoder(raw):  # EmbeddingGemma: a decoder family's block and weights, run bidirectionally
            if weights != "f32":
                raise InvalidParameterError(f"{source.name} (a decoder block run as an encoder) loads as f32 only; "
                                            f"got weights={weights!r}")
            decoder, params, raw = load_hf_folder(source.path, weights=weights, progress=progress, bidirectional=True)
            cfg = EncoderConfig.from_decoder(decoder)
        else:
            cfg, params = load_encoder_folder(source.path, raw, weights)
        tokenizer = tokenizer_from_files(source.path)
        sentence = read_sentence_config(source.path, cfg, None)
        if sentence.dense:
            params["dense"] = load_dense(source.path, sentence)
        if tokenizer.vocab_size > cfg.vocab_size and not _extra_tokens_special(tokenizer, cfg.vocab_size):
            raise ModelFormatError(f"{source.path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                                   f"{cfg.vocab_size} embedding rows")
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
    if tokenizer.vocab_size > cfg.vocab_size and not encoder:  # an encoder's were checked above
        raise ModelFormatError(
            f"{source.path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{cfg.vocab_size} embedding rows"
        )
    info["config"] = dataclasses.asdict(cfg)
    info["weights"] = weights
    info["weight_bytes"] = param_bytes(params)
    return LoadedModel(cfg, params, tokenizer, info, time.perf_counter() - start, sentence)


def _native_gguf_params(f: Any, cfg: ModelConfig, source: ModelSource, progress: Any, weights_cache: Any
                        ) -> tuple[Any, dict[str, str]]:
    """A GGUF's kept-quantized params, mapped from the weights cache where it has them (loading/weights_cache.py),
    else repacked from the open file (and written to the cache)."""
    from corejax.loading import weights_cache as wc

    def check(p: Any) -> str:
        fits = isinstance(p, dict) and isinstance(p.get("layers"), list) and len(p["layers"]) == cfg.num_layers
        return "" if fits and "lm_head" in p else "its params do not match the file's config"

    params, status = wc.load_or_build(cache_plan(source, weights_cache), source.path,
                                      lambda: load_gguf_params(f, cfg, weights="native", progress=progress), check)
    if status["status"] == "hit" and callable(progress):  # the parent's bar, a step per tensor as a repack reports
        for done in range(1, len(f.tensors) + 1):
            progress("loading weights", done, len(f.tensors))
    return params, status


@dataclasses.dataclass(frozen=True)
class WeightPlan:
    """What loading a model will hold, read from its headers before any tensor is (memory.py reserves it).

    weight_bytes: the params in the chosen weights mode; loading_bytes: held only while loading — the file
    pages the mmap'd reads make resident, plus the largest one tensor's conversion holds (convert.weight_bytes);
    native_bytes: what weights="native" would hold instead (GGUF only, for hints); mapped: the weights come
    mapped from a valid weights cache (loading/weights_cache.py): file-backed pages, no loading transient."""

    cfg: Any
    weights: str
    weight_bytes: int
    loading_bytes: int
    file_bytes: int
    tensors: int
    native_bytes: int | None = None
    mapped: bool = False


def plan_weights(source: ModelSource, weights: str | None = None) -> WeightPlan:
    """Sizes the params load_model(source, weights) would build, from the tensor table alone."""
    from corejax.loading.convert import gguf_names, hf_names, weight_bytes

    weights = weights or "f32"
    if source.format == "gguf":
        with read_gguf(source.path) as f:
            cfg = gguf_config(f, f.metadata)
            table = {name: (t.shape, t.ggml_type.name if t.ggml_type in UNPACKERS else None)
                     for name, t in f.tensors.items()}
        names = gguf_names(cfg)
        file_bytes = source.path.stat().st_size
        native = weight_bytes(cfg, names, table, "native")[0]
    elif source.format == "hf":
        table, file_bytes = _safetensors_table(source.path)
        if _is_encoder_folder(source.path) and not _is_bidirectional_folder(source.path):
            from corejax.loading.encoder import read_hf_config

            cfg = EncoderConfig.from_hf(read_hf_config(source.path), with_head=False)
            numel = [int(np.prod(shape)) for shape, _ in table.values()]
            largest = max(numel, default=0)
            # weights="f16"/"bf16": the layers' matrices at 2 bytes (loading/encoder.py), the rest float32.
            total = sum((2 if weights in ("f16", "bf16") and len(shape) == 2 and ".layer." in name else 4) * int(np.prod(shape))
                        for name, (shape, _) in table.items())
            return WeightPlan(cfg, weights, total, file_bytes + 8 * largest, file_bytes, len(table))
        from corejax.loading.encoder import read_hf_config

        raw = read_hf_config(source.path)
        bidirectional = is_bidirectional_decoder(raw)  # EmbeddingGemma: sized as its decoder, served as an encoder
        cfg = ModelConfig.from_hf(raw, bidirectional=bidirectional)
        prefix = next((p for p in ("model.", "language_model.model.", "model.language_model.", "")
                       if f"{p}embed_tokens.weight" in table), "model.")
        names, native = hf_names(cfg, prefix), None
    else:
        raise ModelFormatError(f"unknown model format {source.format!r} for {source.path}")
    total, transient = weight_bytes(cfg, names, table, weights)
    used = sum(1 for n in names.values() if n in table)
    if source.format == "hf" and bidirectional:
        cfg = EncoderConfig.from_decoder(cfg)
    return WeightPlan(cfg, weights, total, file_bytes + transient, file_bytes, used, native)


@reads_untrusted("a safetensors header")
def _safetensors_table(folder: Path) -> tuple[dict[str, tuple[tuple[int, ...], None]], int]:
    """Tensor name -> (shape, None) from each safetensors file's JSON header, and the files' total bytes."""
    from corejax.loading.convert import safetensors_files

    table: dict[str, tuple[tuple[int, ...], None]] = {}
    total = 0
    for path in safetensors_files(folder):
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                n = struct.unpack("<Q", fh.read(8))[0] if size >= 8 else -1
                if not 0 < n <= size - 8:
                    raise ModelFormatError(f"{path}: its header length {n} does not fit the file ({size} bytes)")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise ModelFormatError(f"{path}: not a readable safetensors file ({e})") from None
        total += size
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict):
                table[name] = (tuple(int(d) for d in entry.get("shape", ())), None)
    return table, total


def _is_encoder_folder(folder: Path) -> bool:
    from corejax.types.config import is_encoder_config
    from corejax.loading.encoder import read_hf_config

    return is_encoder_config(read_hf_config(folder))


def _is_bidirectional_folder(folder: Path) -> bool:
    """A decoder family's folder with use_bidirectional_attention (EmbeddingGemma): an encoder, never causal."""
    from corejax.loading.encoder import read_hf_config

    return is_bidirectional_decoder(read_hf_config(folder))


def _extra_tokens_special(tokenizer: Any, rows: int) -> bool:
    """Whether every token id past the embedding's `rows` is a special added token (EmbeddingGemma's tokenizer
    keeps Gemma 3's <image_soft_token>, id 262144, beyond its 262144 rows): a text holding one is refused when
    it is tokenized (serving/encode.py), so none reaches the embedding."""
    from corejax.tokenizer.base import CONTROL

    return bool((tokenizer.token_types[rows:] == CONTROL).all())


# The projection matrices the native float kernel multiplies (kernels/small_matmul.py), by parameter key:
# a decoder's (corejax/models/layers.py) and an encoder's (corejax/models/bert.py).
DECODER_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
ENCODER_MATRICES = ("wqkv", "wo", "w_in", "w_out")


def block_params(params: dict, kernels: Kernels, keys: tuple[str, ...] = DECODER_MATRICES) -> dict:
    """The float matrices named `keys` in each layer (and a decoder's LM head) in the native float kernel's
    column blocks (BlockedWeight), converted one at a time with each original freed at once, so loading never
    holds two copies of the model. bfloat16 ones only where the kernels multiply them (kernels.bf16_dot)."""
    from corejax.kernels.small_matmul import blockable, to_blocked

    def convert(w):
        if not blockable(w, kernels.bf16_dot):
            return w
        blocked = to_blocked(w)
        w.delete()
        return blocked

    out = dict(params)
    out["layers"] = [{key: convert(v) if key in keys else v for key, v in layer.items()}
                     for layer in params["layers"]]
    if "lm_head" in params:
        out["lm_head"] = convert(params["lm_head"])
    return out
