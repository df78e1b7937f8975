"""HF BERT and MPNet folders -> EncoderConfig, params (models/bert.py layout) and the sentence-transformers
metadata.

The one place that knows their checkpoint names (`encoder.layer.N.attention.self.query.weight`, MPNet's
`encoder.layer.N.attention.attn.q.weight`, the `bert.` prefix of *ForSequenceClassification checkpoints) and
sentence-transformers' modules.json."""

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

# Our per-layer name -> the checkpoint's (under `encoder.layer.N.`), by EncoderConfig.arch.
_LAYER = {
    "bert": {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "o": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
        "in": "intermediate.dense", "out": "output.dense", "ffn_norm": "output.LayerNorm",
    },
    "mpnet": {
        "q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v",
        "o": "attention.attn.o", "attn_norm": "attention.LayerNorm",
        "in": "intermediate.dense", "out": "output.dense", "ffn_norm": "output.LayerNorm",
    },
}


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
    """How token states become one vector (sentence-transformers' modules.json and its module folders)."""

    pooling: str = "cls"  # "mean" | "cls" | "max"
    normalize: bool = False
    max_length: int = 512
    dense: tuple[DenseModule, ...] = ()  # Dense modules between pooling and Normalize, in order (load_dense)


@dataclasses.dataclass(frozen=True)
class DenseModule:
    """One sentence-transformers Dense module (its folder's config.json): activation(x @ W + b)."""

    path: str  # the module's folder under the model folder (its model.safetensors holds linear.weight/.bias)
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a name of models/sentence.py ACTIVATIONS


# sentence-transformers' Dense activation_function (a torch class path) -> models/sentence.py ACTIVATIONS.
DENSE_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",  # Dense's default
    "torch.nn.modules.activation.ReLU": "relu",
}


def _dense_module(folder: Path, m: dict, n_in: int) -> DenseModule:
    """A Dense module's config.json, checked: an implemented activation, in_features matching what feeds it."""
    path = str(m.get("path", ""))
    dc = json.loads((folder / path / "config.json").read_text())
    act = dc.get("activation_function", "torch.nn.modules.activation.Tanh")
    if act not in DENSE_ACTIVATIONS:
        raise UnsupportedModelError(
            f"{folder}: the Dense module {path!r} applies the activation {act!r}, which corejax does not implement "
            f"(it runs {', '.join(DENSE_ACTIVATIONS)}); running it without would compute something else, so it is "
            "refused. Use sentence-transformers for this model")
    module = DenseModule(path, int(dc["in_features"]), int(dc["out_features"]), bool(dc.get("bias", True)),
                         DENSE_ACTIVATIONS[act])
    if module.in_features != n_in or module.out_features <= 0:
        raise ModelFormatError(f"{folder}: the Dense module {path!r} takes {module.in_features} features but is fed "
                               f"{n_in}")
    return module


def load_dense(folder: Path, sentence: SentenceConfig) -> list[dict[str, Any]]:
    """The Dense modules' weights (models/sentence.py layout: w [in, out], b [out] float32), from each module
    folder's model.safetensors (linear.weight [out, in], linear.bias); any other tensor there is refused."""
    from safetensors import safe_open

    out = []
    for m in sentence.dense:
        path = folder / m.path / "model.safetensors"
        if not path.exists():
            raise ModelFormatError(f"{folder}: the Dense module {m.path!r} has no model.safetensors (corejax reads "
                                   "safetensors only)")
        wanted = {"linear.weight": (m.out_features, m.in_features)} | ({"linear.bias": (m.out_features,)}
                                                                       if m.bias else {})
        try:
            with safe_open(str(path), framework="flax") as f:
                names = set(f.keys())
                support.check_unread_tensors(names, wanted, (), str(folder / m.path))
                tensors = {}
                for name, shape in wanted.items():
                    if name not in names:
                        raise ModelFormatError(f"{path}: missing tensor {name!r}")
                    t = np.asarray(f.get_tensor(name), dtype=np.float32)
                    if t.shape != shape:
                        raise ModelFormatError(f"{path}: tensor {name!r} has shape {t.shape}, its config implies "
                                               f"{shape}")
                    tensors[name] = t
        except (OSError, ValueError) as e:  # safetensors' own errors are ValueError / OSError subclasses
            if isinstance(e, (ModelFormatError, UnsupportedModelError)):
                raise
            raise ModelFormatError(f"{path}: not a readable safetensors file ({e})") from None
        layer = {"w": jnp.asarray(tensors["linear.weight"].T)}
        if m.bias:
            layer["b"] = jnp.asarray(tensors["linear.bias"])
        out.append(layer)
    return out


def read_sentence_config(folder: Path, cfg: EncoderConfig, tokenizer_max: int | None) -> SentenceConfig:
    """modules.json's Pooling, Dense and Normalize modules, max_seq_length from sentence_bert_config.json.

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
        pooling, normalize, pooled = "cls", False, False
        dense: list[DenseModule] = []
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
                pooling, pooled = modes[0], True
            elif kind == "Dense":  # on the pooled vector: after Pooling, before Normalize
                if not pooled or normalize:
                    where = "before Pooling" if not pooled else "after Normalize"
                    raise UnsupportedModelError(f"{folder}: a Dense module {where} is not supported (corejax runs "
                                                "Dense modules between Pooling and Normalize)")
                dense.append(_dense_module(folder, m, dense[-1].out_features if dense else cfg.hidden_size))
            elif kind == "Normalize":
                normalize = True
            elif kind != "Transformer":
                raise UnsupportedModelError(f"{folder}: the sentence-transformers module {m.get('type')!r} is not "
                                            "supported (corejax runs Transformer, Pooling, Dense and Normalize)")
    except (ModelFormatError, UnsupportedModelError):
        raise
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        raise ModelFormatError(f"{folder}: modules.json or a module's config is unreadable ({e})") from None
    return SentenceConfig(pooling, normalize, max_length, tuple(dense))


def load_encoder_folder(folder: Path, raw: dict, weights: str = "f32") -> tuple[EncoderConfig, dict[str, Any]]:
    """A BERT checkpoint (BertModel, or *ForSequenceClassification with its head) or an MPNetModel ->
    (config, params).

    weights "f16": the layers' four projection matrices are held as float16 (half the memory and the bytes
    each token streams; the native kernel widens them to float32 as it reads, and every sum, norm and
    activation stays float32). "bf16": the same matrices as bfloat16, and the kernel rounds each matmul's
    input rows to bfloat16 too, so one vdpbf16ps does two float32 FMAs' work (sums, norms, activations,
    attention stay float32). Both keep all-MiniLM-L6-v2's embeddings within the parity bar of
    sentence-transformers' float32, and bf16 is the faster (docs/MEASUREMENTS.md). Embeddings, biases, norms and
    the classification head stay float32."""
    from safetensors import safe_open

    where = dict(iter_safetensors(safetensors_files(folder)))
    prefix = next((p for p in ("", "bert.", "mpnet.", "model.") if f"{p}embeddings.word_embeddings.weight" in where),
                  None)
    if prefix is None:
        raise ModelFormatError(f"{folder}: no embeddings.word_embeddings.weight tensor; not a BERT or MPNet "
                               "checkpoint")
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
    position_rows = cfg.max_context + (0 if cfg.position_padding_idx is None else cfg.position_padding_idx + 1)
    params: dict[str, Any] = {
        "embed": jnp.asarray(get(e + "word_embeddings.weight", (cfg.vocab_size, d))),
        "embed_positions": jnp.asarray(get(e + "position_embeddings.weight", (position_rows, d))),
        "embed_norm": norm(e + "LayerNorm"),
        "layers": [],
    }
    if cfg.type_vocab_size:
        params["embed_types"] = jnp.asarray(get(e + "token_type_embeddings.weight", (cfg.type_vocab_size, d)))
    if cfg.relative_buckets:  # one table every layer shares (MPNetEncoder.relative_attention_bias)
        params["relative_bias"] = jnp.asarray(get(f"{prefix}encoder.relative_attention_bias.weight",
                                                  (cfg.relative_buckets, cfg.num_heads)))
    names = _LAYER[cfg.arch]
    sizes = {"o": (d, d), "in": (d, f), "out": (f, d)}
    matrix = {"f16": jnp.float16, "bf16": jnp.bfloat16}.get(weights, jnp.float32)
    for i in range(cfg.num_layers):
        base = f"{prefix}encoder.layer.{i}."
        layer: dict[str, Any] = {}
        # Query, key and value as one [D, 3D] matrix: one matmul reads the three (fewer, larger calls).
        qkv = [linear(base + names[name], d, d) for name in "qkv"]
        layer["wqkv"] = jnp.asarray(np.concatenate([w for w, _ in qkv], axis=1), matrix)
        layer["bqkv"] = jnp.asarray(np.concatenate([b for _, b in qkv]))
        for ours, n_in_out in sizes.items():
            w, b = linear(base + names[ours], *n_in_out)
            layer[f"w{ours}" if len(ours) == 1 else f"w_{ours}"] = jnp.asarray(w, matrix)
            layer[f"b{ours}" if len(ours) == 1 else f"b_{ours}"] = jnp.asarray(b)
        layer["attn_norm"] = norm(base + names["attn_norm"])
        layer["ffn_norm"] = norm(base + names["ffn_norm"])
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
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{folder} has no config.json; an HF folder needs config.json and weights") from None
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than Python's parser recurses
        raise ModelFormatError(f"{path} is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path} holds a JSON {type(config).__name__}, not an object of settings")
    return config
