"""HF BERT folders -> EncoderConfig, params (models/bert.py layout) and the sentence-transformers metadata.

The one place that knows BERT's checkpoint names (`encoder.layer.N.attention.self.query.weight`, the
`bert.` prefix of *ForSequenceClassification checkpoints) and sentence-transformers' modules.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from corejax.types import support
from corejax.types.config import EncoderConfig
from corejax.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from corejax.loading.convert import iter_safetensors, safetensors_files

# Our per-layer name -> BERT's (under `encoder.layer.N.`); "{w}" is weight or bias.
_LAYER = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "o": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "in": "intermediate.dense", "out": "output.dense", "ffn_norm": "output.LayerNorm",
}


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
    """How token states become one vector (sentence-transformers' modules.json and its module folders)."""

    pooling: str = "cls"  # "mean" | "cls" | "max"
    normalize: bool = False
    max_length: int = 512


def read_sentence_config(folder: Path, cfg: EncoderConfig, tokenizer_max: int | None) -> SentenceConfig:
    """modules.json's Pooling and Normalize modules, max_seq_length from sentence_bert_config.json.

    A folder without modules.json (a plain transformers checkpoint) gets CLS pooling, no normalization."""
    max_length = min(cfg.max_context, tokenizer_max or cfg.max_context)
    modules_path = folder / "modules.json"
    if not modules_path.exists():
        return SentenceConfig(max_length=max_length)
    try:
        modules = json.loads(modules_path.read_text())
        sbert = folder / "sentence_bert_config.json"
        if sbert.exists():
            max_length = min(int(json.loads(sbert.read_text()).get("max_seq_length") or max_length), cfg.max_context)
        pooling, normalize = "cls", False
        for m in modules:
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            if kind == "Pooling":
                pc = json.loads((folder / m.get("path", "") / "config.json").read_text())
                modes = [mode for mode in ("cls", "mean", "max") if pc.get(f"pooling_mode_{mode}_token"
                                                                              if mode == "cls" else
                                                                              f"pooling_mode_{mode}_tokens")]
                if len(modes) != 1 or any(pc.get(k) for k in ("pooling_mode_mean_sqrt_len_tokens",
                                                               "pooling_mode_weightedmean_tokens",
                                                               "pooling_mode_lasttoken")):
                    raise UnsupportedModelError(f"{folder}: pooling {pc} is not supported; corejax pools with "
                                                "exactly one of cls, mean or max")
                pooling = modes[0]
            elif kind == "Normalize":
                normalize = True
            elif kind != "Transformer":
                raise UnsupportedModelError(f"{folder}: the sentence-transformers module {m.get('type')!r} is not "
                                            "supported (corejax runs Transformer, Pooling and Normalize)")
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ModelFormatError(f"{folder}: modules.json or a module's config is unreadable ({e})") from None
    return SentenceConfig(pooling, normalize, max_length)


def load_encoder_folder(folder: Path, raw: dict, weights: str = "f32") -> tuple[EncoderConfig, dict[str, Any]]:
    """A BERT checkpoint (BertModel, or *ForSequenceClassification with its head) -> (config, params).

    weights "f16": the layers' four projection matrices are held as float16 (half the memory and the bytes
    each token streams; the native kernel widens them to float32 as it reads, and every sum, norm and
    activation stays float32). "bf16": the same matrices as bfloat16, and the kernel rounds each matmul's
    input rows to bfloat16 too, so one vdpbf16ps does two float32 FMAs' work (sums, norms, activations,
    attention stay float32). Both keep all-MiniLM-L6-v2's embeddings within the parity bar of
    sentence-transformers' float32, and bf16 is the faster (docs/MEASUREMENTS.md). Embeddings, biases, norms and
    the classification head stay float32."""
    from safetensors import safe_open

    where = dict(iter_safetensors(safetensors_files(folder)))
    prefix = next((p for p in ("", "bert.", "model.") if f"{p}embeddings.word_embeddings.weight" in where), None)
    if prefix is None:
        raise ModelFormatError(f"{folder}: no embeddings.word_embeddings.weight tensor; not a BERT checkpoint")
    with_head = "classifier.weight" in where
    if with_head and f"{prefix}pooler.dense.weight" not in where:
        raise UnsupportedModelError(f"{folder}: a classifier without BERT's pooler is not supported")
    cfg = EncoderConfig.from_hf(raw, with_head=with_head)
    handles: dict[Path, Any] = {}
    read: set[str] = set()  # what the model took, so every other tensor can be checked against ENCODER_UNREAD

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in where:
            raise ModelFormatError(f"{folder}: missing tensor {name!r}")
        read.add(name)
        path, key = where[name]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="flax")
        w = np.asarray(handles[path].get_tensor(key), dtype=np.float32)
        if w.shape != shape:
            raise ModelFormatError(f"{folder}: tensor {name!r} has shape {w.shape} but config.json implies {shape}")
        return w

    d, f = cfg.hidden_size, cfg.ffn_size

    def linear(name: str, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
        return get(f"{name}.weight", (n_out, n_in)).T, get(f"{name}.bias", (n_out,))

    def norm(name: str) -> dict[str, jnp.ndarray]:
        return {"scale": jnp.asarray(get(f"{name}.weight", (d,))), "bias": jnp.asarray(get(f"{name}.bias", (d,)))}

    e = f"{prefix}embeddings."
    params: dict[str, Any] = {
        "embed": jnp.asarray(get(e + "word_embeddings.weight", (cfg.vocab_size, d))),
        "embed_positions": jnp.asarray(get(e + "position_embeddings.weight", (cfg.max_context, d))),
        "embed_types": jnp.asarray(get(e + "token_type_embeddings.weight", (cfg.type_vocab_size, d))),
        "embed_norm": norm(e + "LayerNorm"),
        "layers": [],
    }
    sizes = {"o": (d, d), "in": (d, f), "out": (f, d)}
    matrix = {"f16": jnp.float16, "bf16": jnp.bfloat16}.get(weights, jnp.float32)
    for i in range(cfg.num_layers):
        base = f"{prefix}encoder.layer.{i}."
        layer: dict[str, Any] = {}
        # Query, key and value as one [D, 3D] matrix: one matmul reads the three (fewer, larger calls).
        qkv = [linear(base + _LAYER[name], d, d) for name in "qkv"]
        layer["wqkv"] = jnp.asarray(np.concatenate([w for w, _ in qkv], axis=1), matrix)
        layer["bqkv"] = jnp.asarray(np.concatenate([b for _, b in qkv]))
        for ours, n_in_out in sizes.items():
            w, b = linear(base + _LAYER[ours], *n_in_out)
            layer[f"w{ours}" if len(ours) == 1 else f"w_{ours}"] = jnp.asarray(w, matrix)
            layer[f"b{ours}" if len(ours) == 1 else f"b_{ours}"] = jnp.asarray(b)
        layer["attn_norm"] = norm(base + _LAYER["attn_norm"])
        layer["ffn_norm"] = norm(base + _LAYER["ffn_norm"])
        params["layers"].append(layer)
    if with_head:
        pw, pb = linear(f"{prefix}pooler.dense", d, d)
        cw, cb = linear("classifier", d, cfg.num_labels)
        params["head"] = {k: jnp.asarray(v) for k, v in
                          {"pooler_w": pw, "pooler_b": pb, "classifier_w": cw, "classifier_b": cb}.items()}
    support.check_unread_tensors(where, read, support.ENCODER_UNREAD, str(folder))
    return cfg, params


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{folder} has no config.json; an HF folder needs config.json and weights") from None
    except ValueError as e:
        raise ModelFormatError(f"{path} is not valid JSON ({e})") from None
