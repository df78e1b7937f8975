"""An HF Llama-family folder seen as a GGUF model (for `corejax quantize`): llama.cpp's metadata keys, tensor names
and Q/K row order, and the tokenizer.json turned into tokenizer.ggml.* keys as convert_hf_to_gguf.py does.

llama.cpp picks tokenizer.ggml.pre by hashing the tokenizer's output on a probe text; here each pre-tokenizer
corejax implements (llama.cpp's table) is tried on a probe text, and the first whose ids equal HF tokenizers'
is written, so the file tokenizes like the folder — or the conversion is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from corejax.types.config import ModelConfig
from corejax.errors import ModelFormatError, UnsupportedModelError
from corejax.loading.convert import (
    LAYER_NAMES,
    check_hf_tensors,
    expected_shapes,
    hf_names,
    iter_safetensors,
    safetensors_files,
)

# gguf's GGUFValueType and TokenType numbers (stable parts of the format).
_UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5
# gguf-py's SpecialVocab kinds -> the GGUF key words (gguf.Keys.Tokenizer: padding_token_id, not pad_token_id).
_ID_KEYS = {"unk": "unknown", "pad": "padding", "sep": "seperator"}

# Digits, runs of spaces and newlines, contractions, punctuation, accents, CJK and emoji: where pre-tokenizers differ.
PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
         "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
         "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
         "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL done")



@dataclasses.dataclass
class SourceTensor:
    """One tensor to write: its GGUF name and numpy-order shape, how to read rows of it as float32, and, when
    it may be copied as stored, its ggml type and bytes."""

    name: str
    shape: tuple[int, ...]
    rows: Any  # (start, stop) -> float32 [stop - start, shape[-1]] (2-D tensors), or () -> the whole tensor
    stored_type: Any = None  # GGMLType of `raw`, or None: write float32
    raw: Any = None  # () -> uint8 bytes as stored

def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved order (convert_hf_to_gguf.py's LlamaModel.permute);
    convert._unpermute_rope is its inverse."""
    out = w.shape[0]
    return w.reshape(heads, 2, out // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_keys(folder: Path, vocab_size: int) -> list[tuple[str, Any, int, int | None]]:
    from gguf.vocab import SpecialVocab
    from tokenizers import Tokenizer as HFTokenizer

    path = folder / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
    except FileNotFoundError:
        raise UnsupportedModelError(f"{folder} has no tokenizer.json; corejax quantize needs one for the GGUF "
                                    "tokenizer") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFormatError(f"{path} is not a tokenizer.json ({e})") from None
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UnsupportedModelError(
            f"{path}: only byte-level BPE tokenizers (GPT-2 style, as Llama 3, SmolLM and Qwen use) convert so far; "
            "convert this one with llama.cpp's convert_hf_to_gguf.py, then corejax quantize the GGUF")
    ids: dict[int, tuple[str, int]] = {int(i): (t, _NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        ids[int(added["id"])] = (added["content"], _CONTROL if added.get("special") else _USER_DEFINED)
    n = max(vocab_size, max(ids) + 1)
    tokens = [ids.get(i, (f"[PAD{i}]", _UNUSED))[0] for i in range(n)]
    types = [ids.get(i, (f"[PAD{i}]", _UNUSED))[1] for i in range(n)]
    special = SpecialVocab(folder, load_merges=True, n_vocab=n)
    keys: list[tuple[str, Any, int, int | None]] = [
        ("tokenizer.ggml.model", "gpt2", _STRING, None),
        ("tokenizer.ggml.tokens", tokens, _ARRAY, _STRING),
        ("tokenizer.ggml.token_type", types, _ARRAY, _INT32),
        ("tokenizer.ggml.merges", list(special.merges), _ARRAY, _STRING),
    ]
    for kind, token_id in special.special_token_ids.items():
        keys.append((f"tokenizer.ggml.{_ID_KEYS.get(kind, kind)}_token_id", int(token_id), _UINT32, None))
    for kind, value in special.add_special_token.items():
        keys.append((f"tokenizer.ggml.add_{kind}_token", bool(value), _BOOL, None))
    if isinstance(special.chat_template, str):
        keys.append(("tokenizer.chat_template", special.chat_template, _STRING, None))
    pre = _pre_tokenizer(keys, HFTokenizer.from_file(str(path)), path)
    keys.insert(1, ("tokenizer.ggml.pre", pre, _STRING, None))
    return keys


def _pre_tokenizer(keys: list, reference: Any, path: Path) -> str:
    """The first pre-tokenizer name whose corejax tokenizer encodes PROBE to HF tokenizers' ids."""
    from corejax.tokenizer import tokenizer_from_gguf_metadata
    from corejax.tokenizer.gguf import PRE_TOKENIZERS

    meta = {k: (np.asarray(v, np.int32) if k == "tokenizer.ggml.token_type" else v) for k, v, _, _ in keys}
    want = reference.encode(PROBE, add_special_tokens=False).ids
    tried = set()
    # llama.cpp's fallback goes last: with a small vocabulary it can agree with a more specific splitter.
    names = sorted(PRE_TOKENIZERS, key=lambda n: n == "default")
    for name in names:
        rule = PRE_TOKENIZERS[name]
        if rule in tried:
            continue
        tried.add(rule)
        tok = tokenizer_from_gguf_metadata(dict(meta, **{"tokenizer.ggml.pre": name}))
        if tok.encode(PROBE, add_special=False) == want:
            return name
    raise UnsupportedModelError(
        f"{path}: none of the {len(tried)} pre-tokenizers corejax implements splits text as this tokenizer does, "
        "so a GGUF of it would tokenize differently; convert it with llama.cpp's convert_hf_to_gguf.py")


class hf_as_gguf:
    """`with hf_as_gguf(folder) as (arch, metadata, tensors)`: what corejax.quantize writes (its SourceTensor)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.handles: dict[Path, Any] = {}

    def __enter__(self) -> tuple[str, list, list]:
        from safetensors import safe_open

        from corejax.loading.encoder import read_hf_config

        folder = self.folder
        raw = read_hf_config(folder)
        cfg = ModelConfig.from_hf(raw)
        if cfg.arch != "llama":
            raise UnsupportedModelError(f"{folder}: corejax quantize converts Llama-family HF folders so far, not "
                                        f"{cfg.arch}; convert it with llama.cpp's convert_hf_to_gguf.py first")
        if cfg.rope_scaling is not None and cfg.rope_scaling.kind != "linear":
            raise UnsupportedModelError(f"{folder}: RoPE scaling {cfg.rope_scaling.kind!r} does not convert yet "
                                        "(llama.cpp stores it as a rope_freqs tensor)")
        where = dict(iter_safetensors(safetensors_files(folder)))
        prefix = next((p for p in ("model.", "language_model.model.", "model.language_model.", "")
                       if f"{p}embed_tokens.weight" in where), None)
        if prefix is None:
            raise ModelFormatError(f"{folder}: no embed_tokens.weight tensor; not a decoder checkpoint corejax knows")
        a = "llama."
        meta: list[tuple[str, Any, int, int | None]] = [
            ("general.name", str(raw.get("_name_or_path") or folder.name), _STRING, None),
            (a + "context_length", cfg.max_context, _UINT32, None),
            (a + "embedding_length", cfg.hidden_size, _UINT32, None),
            (a + "block_count", cfg.num_layers, _UINT32, None),
            (a + "feed_forward_length", cfg.ffn_size, _UINT32, None),
            (a + "attention.head_count", cfg.num_heads, _UINT32, None),
            (a + "attention.head_count_kv", cfg.num_kv_heads, _UINT32, None),
            (a + "attention.key_length", cfg.head_dim, _UINT32, None),
            (a + "attention.value_length", cfg.head_dim, _UINT32, None),
            (a + "rope.dimension_count", cfg.head_dim, _UINT32, None),
            (a + "rope.freq_base", float(cfg.rope_theta), _FLOAT32, None),
            (a + "attention.layer_norm_rms_epsilon", float(cfg.norm_eps), _FLOAT32, None),
            (a + "vocab_size", cfg.vocab_size, _UINT32, None),
        ]
        if cfg.rope_scaling is not None:
            meta += [(a + "rope.scaling.type", "linear", _STRING, None),
                     (a + "rope.scaling.factor", float(cfg.rope_scaling.factor), _FLOAT32, None)]
        meta += _tokenizer_keys(folder, cfg.vocab_size)

        def read(name: str) -> np.ndarray:
            if name not in where:
                raise ModelFormatError(f"{folder}: missing tensor {name!r}")
            path, key = where[name]
            if path not in self.handles:
                self.handles[path] = safe_open(str(path), framework="flax")  # flax reads bf16; numpy cannot
            return np.asarray(self.handles[path].get_tensor(key), dtype=np.float32)

        ours = hf_names(cfg, prefix)
        check_hf_tensors(folder, cfg, ours, where, read)
        gguf = {"final_norm": "output_norm.weight", "embed": "token_embd.weight", "lm_head": "output.weight"}
        shapes = expected_shapes(cfg)
        for i in range(cfg.num_layers):
            for key in shapes:
                gguf[f"{i}.{key}"] = f"blk.{i}.{LAYER_NAMES[key][0]}"
        order = ["embed"] + ([] if cfg.tie_embeddings else ["lm_head"]) + ["final_norm"] + [
            f"{i}.{key}" for i in range(cfg.num_layers) for key in shapes]
        tensors = []
        for key in order:
            hf = ours[key]
            if hf not in where:
                raise ModelFormatError(f"{folder}: missing tensor {hf!r}")
            shape = tuple(_shape(self.handles, safe_open, *where[hf]))
            heads = (cfg.num_heads if key.endswith(".wq") else cfg.num_kv_heads if key.endswith(".wk") else None)

            def rows(start: int = 0, stop: int | None = None, hf: str = hf, heads: int | None = heads) -> np.ndarray:
                # One tensor is cached while its slabs are read: Q/K must be permuted whole first.
                if self._cached[0] != hf:
                    w = read(hf)
                    self._cached = (hf, _permute(w, heads) if heads else w)
                w = self._cached[1]
                return w if w.ndim == 1 else w[start:stop]

            tensors.append(SourceTensor(gguf[key], shape, rows))
        self._cached: tuple[str | None, Any] = (None, None)
        return "llama", meta, tensors

    def __exit__(self, *exc: object) -> None:
        self.handles.clear()
        self._cached = (None, None)


def _shape(handles: dict, safe_open: Any, path: Path, key: str) -> list[int]:
    if path not in handles:
        handles[path] = safe_open(str(path), framework="flax")
    return list(handles[path].get_slice(key).get_shape())
