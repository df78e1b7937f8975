"""Checkpoint names -> corejax params: the one place that knows GGUF's and HF's tensor names and quirks.

Params layout (what models/ sees; matrices are [in, out] so decode GEMVs contract the leading axis):
  lm_head [D, V]; embed [V, D] (untied models only); final_norm [D];
  layers[i]: attn_norm, ffn_norm [D]; wq [D, N*H]; wk, wv [D, K*H]; wo [N*H, D];
             w_gate, w_up [D, F]; w_down [F, D]; as the family has them (expected_shapes): bq [N*H], bk, bv [K*H];
             q_norm, k_norm [H] (per head) or [N*H], [K*H] (whole projection); post_attn_norm, post_ffn_norm [D];
             a mixture of experts in place of w_gate/w_up/w_down: router [D, E]; x_gate, x_up [E, D, F'];
             x_down [E, F', D] (each expert's matrix [in, out], the experts stacked along a leading axis).
Norm weights are stored as the multiplier: Gemma's (1 + w) is applied here, never in the model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from corejax.kernels import ggml_repack
from corejax.weights import quant
from corejax.types import families, support
from corejax.types.config import QUANTIZED_WEIGHTS, WEIGHT_MODES, ModelConfig  # noqa: F401 - WEIGHT_MODES re-exported
from corejax.hostmem import aligned_empty, to_device
from corejax.weights.arena import Arena
from corejax.errors import ModelFormatError, ModelNotFoundError
from corejax.loading.ggml_quants import BLOCK_SIZES, UNPACKERS, GGMLType

Getter = Callable[[str], Any]

# Our per-layer name -> (GGUF name, HF name) of its tensor, for the families that have it (expected_shapes says
# which do). HF names that differ by family: HF_RENAMES.
LAYER_NAMES = {
    "attn_norm": ("attn_norm.weight", "input_layernorm.weight"),
    "wq": ("attn_q.weight", "self_attn.q_proj.weight"),
    "wk": ("attn_k.weight", "self_attn.k_proj.weight"),
    "wv": ("attn_v.weight", "self_attn.v_proj.weight"),
    "bq": ("attn_q.bias", "self_attn.q_proj.bias"),
    "bk": ("attn_k.bias", "self_attn.k_proj.bias"),
    "bv": ("attn_v.bias", "self_attn.v_proj.bias"),
    "q_norm": ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    "k_norm": ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    "wo": ("attn_output.weight", "self_attn.o_proj.weight"),
    "post_attn_norm": ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    "ffn_norm": ("ffn_norm.weight", "post_attention_layernorm.weight"),  # Llama's MLP input norm
    "w_gate": ("ffn_gate.weight", "mlp.gate_proj.weight"),
    "w_up": ("ffn_up.weight", "mlp.up_proj.weight"),
    "w_down": ("ffn_down.weight", "mlp.down_proj.weight"),
    "post_ffn_norm": ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
    # A mixture of experts: llama.cpp stores each layer's experts as one [E, out, in] tensor; HF one tensor per
    # expert ("{}" is the expert's index).
    "router": ("ffn_gate_inp.weight", "mlp.gate.weight"),
    "x_gate": ("ffn_gate_exps.weight", "mlp.experts.{}.gate_proj.weight"),
    "x_up": ("ffn_up_exps.weight", "mlp.experts.{}.up_proj.weight"),
    "x_down": ("ffn_down_exps.weight", "mlp.experts.{}.down_proj.weight"),
}
EXPERTS = ("x_gate", "x_up", "x_down")
# Gemma's MLP input norm has its own name; its post_attention_layernorm normalizes the attention's output.
HF_RENAMES = {"gemma2": {"ffn_norm": "pre_feedforward_layernorm.weight"},
              "gemma3": {"ffn_norm": "pre_feedforward_layernorm.weight"},
              "mixtral": {"router": "block_sparse_moe.gate.weight", "x_gate": "block_sparse_moe.experts.{}.w1.weight",
                          "x_up": "block_sparse_moe.experts.{}.w3.weight",
                          "x_down": "block_sparse_moe.experts.{}.w2.weight"}}
BIASES = ("bq", "bk", "bv")
ROPE_FREQS = "rope_freqs.weight"  # read into ModelConfig.rope_factors (loading/loader.py gguf_config)
ROPE_SHORT = "rope_factors_short.weight"  # Phi-3's LongRoPE short factors, read the same way
# ... and its long factors, which apply past the original context only: with the short ones read, the context is
# capped there (loading/loader.py gguf_config), so they count as read; without them the file is refused.
ROPE_LONG = "rope_factors_long.weight"
# Phi-3's fused matrices, split at load into the keys the model reads.
FUSED_NAMES = {"wqkv": ("attn_qkv.weight", "self_attn.qkv_proj.weight"),
               "w_gate_up": ("ffn_up.weight", "mlp.gate_up_proj.weight")}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint-order ([out, in]) shapes of each per-layer tensor of this family."""
    d, h, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.norms != "post":
        shapes["attn_norm"] = (d,)
    fused = cfg.arch in families.FUSED
    shapes.update(wqkv=(q + 2 * kv, d)) if fused else shapes.update(wq=(q, d), wk=(kv, d), wv=(kv, d))
    if cfg.qkv_bias:
        shapes.update(bq=(q,), bk=(kv,), bv=(kv,))
    if cfg.qk_norm:
        shapes.update(q_norm=(h,) if cfg.qk_norm == "head" else (q,), k_norm=(h,) if cfg.qk_norm == "head" else (kv,))
    shapes["wo"] = (d, q)
    if cfg.norms != "pre":
        shapes["post_attn_norm"] = (d,)
    if cfg.norms != "post":
        shapes["ffn_norm"] = (d,)
    if cfg.num_experts:
        e, g = cfg.num_experts, cfg.expert_ffn_size
        shapes.update(router=(e, d), x_gate=(e, g, d), x_up=(e, g, d), x_down=(e, d, g))
    elif fused:
        shapes.update(w_gate_up=(2 * f, d), w_down=(d, f))
    else:
        shapes.update(w_gate=(f, d), w_up=(f, d), w_down=(d, f))
    if cfg.norms != "pre":
        shapes["post_ffn_norm"] = (d,)
    return shapes


def _unpermute_rope(w: np.ndarray, *, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's Q/K rows for its RoPE; restore HF's rotate-half order."""
    out, d_in = w.shape
    return w.reshape(heads, out // heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _check(name: str, w: Any, shape: tuple[int, ...], source: str) -> None:
    if tuple(w.shape) != shape:
        raise ModelFormatError(
            f"{source}: tensor {name!r} has shape {tuple(w.shape)} but the model config implies {shape}; "
            "the file is inconsistent with its own metadata"
        )


@dataclasses.dataclass
class Blocks:
    """A tensor still in its quantized form, checkpoint order: value = scales * code - mins per block."""

    codes: np.ndarray  # [out, in] integers
    scales: np.ndarray  # [out, in // block] float32
    mins: np.ndarray | None
    fmt: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    def dense(self) -> np.ndarray:
        """value = scales * code - mins, float32 [out, in], in ggml's order."""
        out, d_in = self.codes.shape
        nb = self.scales.shape[1]
        v = self.codes.reshape(out, nb, d_in // nb).astype(np.float32) * self.scales[..., None]
        if self.mins is not None:
            v = v - self.mins[..., None]
        return v.reshape(out, d_in)

    def rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> Blocks:
        """Applies a row permutation (`fn` on [out, X] arrays) to codes, scales and mins alike."""
        return Blocks(fn(self.codes), fn(self.scales), None if self.mins is None else fn(self.mins), self.fmt)


@dataclasses.dataclass
class RawBlocks:
    """A GGUF tensor's block bytes as read, [*lead, out, row_bytes] uint8 (a view of the file's mapping), for
    the formats kernels/ggml_repack.cc turns into the kernel's layout in one pass (quant.from_ggml). Row
    permutations and slices apply to the byte rows as they do to Blocks' arrays; anything else unpacks first."""

    raw: np.ndarray
    d_in: int
    fmt: str

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.raw.shape[:-1], self.d_in)

    def unpacked(self) -> Blocks:
        t = GGMLType[self.fmt]
        lead = self.raw.shape[:-1]
        q = UNPACKERS[t](np.ascontiguousarray(self.raw).reshape(-1, BLOCK_SIZES[t][1]))
        return Blocks(q.codes.reshape(*lead, -1), q.scales.reshape(*lead, -1),
                      None if q.mins is None else q.mins.reshape(*lead, -1), self.fmt)

    def dense(self) -> np.ndarray:
        return self.unpacked().dense()

    def rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> RawBlocks:
        return RawBlocks(fn(self.raw), self.d_in, self.fmt)


QUANTIZED = (Blocks, RawBlocks)


def _matrix(w: np.ndarray | Blocks | RawBlocks, weights: str, into: Callable | None = None) -> Any:
    """A checkpoint-order [out, in] weight -> what models/ gets: f32 [in, out] or a QuantArray (with `into`,
    written into a layer's slots of stacked arrays where quant.from_ggml serves)."""
    if isinstance(w, RawBlocks):
        q = quant.from_ggml(w.raw, w.d_in, w.fmt, into)
        if q is not None:
            return q
        w = w.unpacked()
    if isinstance(w, Blocks):
        if quant.supported(w.shape, w.shape[1] // w.scales.shape[1]):
            return quant.from_blocks(w.codes, w.scales, w.mins, fmt=w.fmt)
        w = w.dense()  # a shape the quantized layout cannot hold: float32 like weights="f32"
    if weights in QUANTIZED_WEIGHTS:
        return quant.quantize(w, 8 if weights == "int8" else 4)
    out = aligned_empty(w.T.shape, w.dtype)
    out[...] = w.T
    return to_device(out)


def _experts(w: np.ndarray | Blocks, weights: str) -> Any:
    """[E, out, in] experts -> each one as `_matrix` makes it, stacked along a leading expert axis (one copy)."""
    from corejax.models.stack import stack_values

    if isinstance(w, RawBlocks):
        parts = [RawBlocks(w.raw[e], w.d_in, w.fmt) for e in range(w.raw.shape[0])]
    elif isinstance(w, Blocks):
        n = w.codes.shape[0]
        parts = [Blocks(w.codes[e], w.scales[e], None if w.mins is None else w.mins[e], w.fmt) for e in range(n)]
    else:
        parts = list(w)
    return stack_values([_matrix(part, weights) for part in parts], free=True)


# Formats whose codes span fewer than 16 values, so quant.from_blocks packs two per byte; the others hold one
# int8 per value. Scales and mins: float16 where ggml stores them as f16 (exact), float32 for K-quants' products.
_PACKED_4BIT = {"Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K"}
_F16_SCALES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}


def _sub_block(fmt: str) -> int:
    """Values per scale of a GGUF quantized format (read off its unpacker, so it cannot drift)."""
    t = GGMLType[fmt]
    block, type_size = BLOCK_SIZES[t]
    return block // UNPACKERS[t](np.zeros((1, type_size), np.uint8)).scales.shape[1]


def matrix_bytes(shape: tuple[int, ...], fmt: str | None, weights: str) -> int:
    """Bytes `_matrix` will hold for a checkpoint [out, in] matrix stored as `fmt` (a GGUF quantized type
    name, or None for a float tensor), computed from the shape alone, before the tensor is read."""
    if len(shape) == 3:  # a stack of experts: each one a matrix
        return shape[0] * matrix_bytes(shape[1:], fmt, weights)
    n = 1
    for d in shape:
        n *= d
    if weights == "native" and fmt is not None and GGMLType[fmt] in UNPACKERS and len(shape) == 2:
        block = _sub_block(fmt)
        if quant.supported(shape, block):
            has_mins = UNPACKERS[GGMLType[fmt]](np.zeros((1, BLOCK_SIZES[GGMLType[fmt]][1]), np.uint8)).mins is not None
            return quant.layout_bytes(shape, 4 if fmt in _PACKED_4BIT else 8, block,
                                      2 if fmt in _F16_SCALES else 4, has_mins)
    if weights in QUANTIZED_WEIGHTS and len(shape) == 2:  # quant.quantize: f16 scales per 32 (and mins for int4)
        return quant.layout_bytes(shape, 8 if weights == "int8" else 4, 32, 2, weights == "int4")
    return n * 4


def weight_bytes(cfg: ModelConfig, names: dict[str, str], tensors: dict[str, tuple[tuple[int, ...], str | None]],
                 weights: str) -> tuple[int, int]:
    """-> (bytes of the params build_params makes, the most bytes one tensor's conversion holds besides them),
    from each checkpoint tensor's (shape, quantized format or None) alone. Mirrors build_params tensor by tensor.

    The transient: a tensor kept in its blocks unpacks to int8 codes, int16 while packing nibbles, and a tiled
    copy (about 4 bytes per value); any other is dequantized to float32 and then transposed or quantized (two
    float32 copies, 8 bytes per value; Gemma 3's embedding's measured peak: docs/MEASUREMENTS.md)."""
    total, transient = 0, 0
    for key, name in names.items():
        if name not in tensors or (key == "lm_head" and cfg.tie_embeddings):
            continue
        shape, fmt = tensors[name]
        n = 1
        for d in shape:
            n *= d
        blocks = weights == "native" and fmt is not None and GGMLType[fmt] in UNPACKERS and len(shape) in (2, 3)
        transient = max(transient, n * (4 if blocks else 8))
        if len(shape) == 1:
            total += n * 4
        elif key == "embed" and not cfg.tie_embeddings and weights not in QUANTIZED_WEIGHTS and (
                fmt is None or weights != "native"):
            total += n * 4  # an untied embedding stays a float table
        else:
            total += matrix_bytes(shape, fmt, weights)
    return total, transient


def build_params(cfg: ModelConfig, get: Getter, names: dict[str, str], *, source: str, weights: str,
                 permuted_qk: bool, norm_offset: float, progress: bool | Callable) -> dict[str, Any]:
    """Shared by both formats: fetch every tensor through `get`, check shapes, fix quirks, lay out [in, out].

    `get` returns float arrays, or Blocks for tensors to keep quantized; weights "int8"/"int4" quantizes
    float matrices here."""
    shapes = expected_shapes(cfg)
    total = 2 + (0 if cfg.tie_embeddings else 1) + cfg.num_layers * len(shapes)
    report = progress if callable(progress) else None  # a sandboxed worker reports to the parent's bar instead
    fetched = [0]
    bar = tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress or report is not None,
               leave=False)

    def fetch(key: str, shape: tuple[int, ...]) -> np.ndarray | Blocks:
        w = get(names[key])
        if not isinstance(w, QUANTIZED):
            w = np.asarray(w, dtype=np.float32)
        _check(names[key], w, shape, source)
        bar.update(1)
        fetched[0] += 1
        if report is not None:
            report("loading weights", fetched[0], total)
        return w

    def norm(w: np.ndarray | Blocks) -> jnp.ndarray:
        if isinstance(w, QUANTIZED):
            raise ModelFormatError(f"{source}: a norm weight is stored quantized ({w.fmt}); expected a float type")
        return jnp.asarray(w + np.float32(norm_offset) if norm_offset else w)

    v, d = cfg.vocab_size, cfg.hidden_size
    params: dict[str, Any] = {"final_norm": norm(fetch("final_norm", (d,)))}
    if cfg.tie_embeddings:
        params["lm_head"] = _matrix(fetch("embed", (v, d)), weights)
    else:
        embed = fetch("embed", (v, d))
        params["embed"] = (jnp.asarray(embed) if isinstance(embed, np.ndarray) and weights not in QUANTIZED_WEIGHTS
                           else _matrix(embed, weights))
        params["lm_head"] = _matrix(fetch("lm_head", (v, d)), weights)
    q, kv, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.ffn_size
    splits = {"wqkv": (("wq", 0, q), ("wk", q, q + kv), ("wv", q + kv, q + 2 * kv)),
              "w_gate_up": (("w_gate", 0, f), ("w_up", f, 2 * f))}

    def parts(key: str, w: np.ndarray | Blocks) -> list[tuple[str, np.ndarray | Blocks]]:
        """A fused matrix's rows as the matrices the model reads (Phi-3: q, k, v; gate then up)."""
        if key not in splits:
            return [(key, w)]
        return [(name, w.rows(lambda a, lo=lo, hi=hi: a[lo:hi]) if isinstance(w, QUANTIZED) else w[lo:hi])
                for name, lo, hi in splits[key]]

    arena = Arena(cfg.num_layers)

    def convert(key: str, w: np.ndarray | Blocks, layer: int) -> Any:
        """One checkpoint tensor -> its param: Q/K rows back in HF's order, then a bias, norm, matrix or experts."""
        if permuted_qk and key in ("wq", "wk", "bq", "bk"):
            heads = cfg.num_heads if key in ("wq", "bq") else cfg.num_kv_heads
            unpermute = functools.partial(_unpermute_rope, heads=heads)
            if len(w.shape) == 1:
                w = unpermute(w[:, None])[:, 0]
            else:
                w = w.rows(unpermute) if isinstance(w, QUANTIZED) else unpermute(w)
        if key in BIASES:
            if isinstance(w, QUANTIZED):
                raise ModelFormatError(f"{source}: a bias is stored quantized ({w.fmt}); expected a float type")
            return jnp.asarray(w)
        if len(w.shape) == 1:
            return norm(w)
        if len(w.shape) == 3:
            return _experts(w, weights)
        return _matrix(w, weights, into=functools.partial(arena.slots, key, layer))

    layers = []
    for i in range(cfg.num_layers):
        layer = {}
        for stored, shape in shapes.items():
            for key, w in parts(stored, fetch(f"{i}.{stored}", shape)):
                layer[key] = convert(key, w, i)
        layers.append(layer)
    params["layers"] = layers
    bar.close()
    return params


def gguf_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"final_norm": "output_norm.weight", "embed": "token_embd.weight", "lm_head": "output.weight"}
    for i in range(cfg.num_layers):
        for key in expected_shapes(cfg):
            names[f"{i}.{key}"] = f"blk.{i}.{(FUSED_NAMES.get(key) or LAYER_NAMES[key])[0]}"
    return names


def _gguf_getter(gguf: Any, weights: str) -> Getter:
    """native: quantized GGUF tensors stay quantized (Blocks); f32: everything dequantized at load."""

    done: list[str] = []
    scratch: list[np.ndarray] = []  # GGUFFile.read's buffer, reused by every tensor

    def get(name: str) -> np.ndarray | Blocks:
        # build_params converts each tensor before it fetches the next: the one before is in its final form.
        for previous in done:
            gguf.release(previous)
        done[:] = [name]
        info = gguf.tensors[name]
        if weights != "native" or info.ggml_type not in UNPACKERS or len(info.shape) not in (2, 3):
            w = gguf.dequantize(name)
            # An F32 tensor comes back as a view of the file's mapping; a param holding it would keep the
            # whole mapping (every page read while loading) resident for the session's life.
            return w.copy() if np.may_share_memory(w, gguf.raw(name)) else w
        block, type_size = BLOCK_SIZES[info.ggml_type]
        if info.ggml_type.name in ggml_repack.FORMATS:  # read, not mapped: converted before the next fetch
            lead = tuple(info.shape[:-1])
            return RawBlocks(gguf.read(name, scratch).reshape(*lead, info.shape[-1] // block * type_size),
                             info.shape[-1], info.ggml_type.name)
        q = UNPACKERS[info.ggml_type](gguf.raw(name).reshape(-1, type_size))
        lead = tuple(info.shape[:-1])  # [out] or [experts, out]
        return Blocks(q.codes.reshape(*lead, -1), q.scales.reshape(*lead, -1),
                      None if q.mins is None else q.mins.reshape(*lead, -1), info.ggml_type.name)

    return get


def load_gguf_params(gguf: Any, cfg: ModelConfig, *, weights: str = "native",
                     progress: bool = True) -> dict[str, Any]:
    """`gguf` is an open corejax.loading.gguf.GGUFFile. weights: one of WEIGHT_MODES."""
    names = gguf_names(cfg)
    read = set(names.values()) | ({ROPE_FREQS, ROPE_SHORT, ROPE_LONG} if cfg.rope_factors else set())
    support.check_unread_tensors(gguf.tensors, read, support.GGUF_UNREAD, str(gguf.path))
    missing = [n for n in names.values() if n not in gguf.tensors and n != "output.weight"]
    if missing:
        raise ModelFormatError(f"{gguf.path}: missing tensors {missing[:4]}{'...' if len(missing) > 4 else ''}")
    return build_params(
        cfg, _gguf_getter(gguf, weights), names, source=str(gguf.path), weights=weights,
        # llama.cpp permutes Q/K for the Llama-derived architectures only; Gemma's norms are stored as (1 + w).
        permuted_qk=cfg.arch in families.PERMUTED_QK, norm_offset=0.0, progress=progress,
    )


def hf_names(cfg: ModelConfig, prefix: str) -> dict[str, str]:
    names = {"final_norm": f"{prefix}norm.weight", "embed": f"{prefix}embed_tokens.weight",
             "lm_head": "lm_head.weight"}
    renames = HF_RENAMES.get(cfg.arch, {})
    for i in range(cfg.num_layers):
        for key in expected_shapes(cfg):
            names[f"{i}.{key}"] = f"{prefix}layers.{i}.{renames.get(key, (FUSED_NAMES.get(key) or LAYER_NAMES[key])[1])}"
    return names


def _expanded(cfg: ModelConfig, names: dict[str, str]) -> set[str]:
    """The tensor names `names` stands for, each expert template ("...experts.{}...") once per expert."""
    return {n.format(e) for n in names.values() for e in (range(cfg.num_experts) if "{}" in n else (0,))}


def check_hf_tensors(folder: Path, cfg: ModelConfig, names: dict[str, str], present: dict[str, Any],
                     read: Callable[[str], np.ndarray]) -> None:
    """Every tensor in the folder is one the model reads or one support.HF_DECODER_UNREAD allows; a tied model's
    stored lm_head.weight must be its embedding, since transformers 4 then uses the embedding and 5 the head."""
    lm_head = names["lm_head"]
    support.check_unread_tensors(present, _expanded(cfg, names), support.HF_DECODER_UNREAD, str(folder))
    if cfg.tie_embeddings and lm_head in present and not np.array_equal(read(lm_head), read(names["embed"])):
        raise ModelFormatError(
            f"{folder}: config.json sets tie_word_embeddings, but the folder's {lm_head} differs from the embedding "
            "(transformers 4 would use the embedding, 5 the stored head); set tie_word_embeddings to false in "
            f"config.json to use {lm_head}, or delete that tensor to use the embedding")


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelFormatError(f"{index}: not a valid safetensors index ({e})") from None
        return sorted({folder / name for name in weight_map.values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder} has no *.safetensors files; an HF folder needs config.json and weights")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, Any]]:
    from safetensors import safe_open

    for path in files:
        try:
            # The "flax" framework reads bf16, which numpy cannot; safetensors mmaps the file either way.
            with safe_open(str(path), framework="flax") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    yield name, (path, name)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelFormatError(f"{path}: not a readable safetensors file ({e})") from None


def load_hf_folder(folder: Path, *, weights: str = "f32", progress: bool = True,
                   bidirectional: bool = False) -> tuple[ModelConfig, dict[str, Any], dict]:
    """An HF folder (config.json + *.safetensors) -> (config, params, raw config dict). bidirectional: a decoder
    family's folder run as an encoder (EmbeddingGemma; ModelConfig.from_hf's bidirectional)."""
    from safetensors import safe_open

    config_path = folder / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{folder} has no config.json; an HF folder needs config.json and weights") from None
    except ValueError as e:
        raise ModelFormatError(f"{config_path} is not valid JSON ({e})") from None
    cfg = ModelConfig.from_hf(raw, bidirectional=bidirectional)
    where = dict(iter_safetensors(safetensors_files(folder)))
    prefix = next((p for p in ("model.", "language_model.model.", "model.language_model.", "")
                   if f"{p}embed_tokens.weight" in where), None)
    if prefix is None:
        raise ModelFormatError(f"{folder}: no embed_tokens.weight tensor; not a decoder checkpoint corejax knows")
    names = hf_names(cfg, prefix)
    if not cfg.tie_embeddings and "lm_head.weight" not in where:
        raise ModelFormatError(f"{folder}: config says untied embeddings but lm_head.weight is missing")
    handles: dict[Path, Any] = {}

    def get(name: str) -> np.ndarray:
        if "{}" in name:  # one tensor per expert: stacked [E, out, in]
            return np.stack([get(name.format(e)) for e in range(cfg.num_experts)])
        if name not in where:
            raise ModelFormatError(f"{folder}: missing tensor {name!r}")
        path, key = where[name]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="flax")
        return np.asarray(handles[path].get_tensor(key), dtype=np.float32)

    check_hf_tensors(folder, cfg, names, where, get)
    params = build_params(cfg, get, names, source=str(folder), weights=weights, permuted_qk=False,
                          norm_offset=families.HF_NORM_OFFSET.get(cfg.arch, 0.0), progress=progress)
    return cfg, params, raw
