"""The decoder families corejax runs, as data: what each one changes in the one decoder block (models/decoder.py
reads the ModelConfig fields these set), read from an HF config.json or from a GGUF file's llama.cpp metadata.

A family is the Llama block plus some of: q/k/v biases (Qwen2), a per-head Q/K RMSNorm (Qwen3, Gemma 3) or one over
the whole projection (OLMo 2), norms around the block's outputs (Gemma: before and after; OLMo 2: after only),
sliding-window layers (Mistral, Gemma), logit soft-capping (Gemma 2), layers without RoPE (SmolLM3), Granite's
multipliers, and a mixture of experts in place of the MLP (Qwen3-MoE, OLMoE, Mixtral: models/moe.py). support.py
refuses what a family's checkpoint asks beyond that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "smollm3", "granite", "olmo2",
                 "qwen3moe", "olmoe", "mixtral", "phi3")
# HF model_type -> corejax's architecture.
HF_ARCH = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
           "gemma3_text": "gemma3", "gemma3": "gemma3", "smollm3": "smollm3", "granite": "granite", "olmo2": "olmo2",
           "qwen3_moe": "qwen3moe", "olmoe": "olmoe", "mixtral": "mixtral", "phi3": "phi3"}
# GGUF general.architecture -> corejax's (llama.cpp writes Mistral, Llama 3 and Mixtral as "llama": a "llama" file
# with experts is a Mixtral).
GGUF_ARCH = {a: a for a in ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "smollm3", "granite", "olmo2",
                            "qwen3moe", "olmoe", "phi3")}
# llama.cpp's converter permutes the Q/K rows of the Llama-derived architectures for its RoPE layout (its
# LlamaModel.undo_permute); the loader undoes it.
PERMUTED_QK = frozenset({"llama", "mistral", "smollm3", "granite", "mixtral"})
MOE = ("qwen3moe", "olmoe", "mixtral")
# Whether the top-k router weights are renormalised to sum 1: what llama.cpp hard-codes per architecture (its
# build_moe_ffn norm_w), and HF's default where config.json says nothing (Mixtral always renormalises).
GGUF_EXPERT_NORM = {"llama": True, "qwen3moe": True, "olmoe": False}
HF_EXPERT_NORM = {"qwen3moe": False, "olmoe": False}
# Phi-3 stores q/k/v as one matrix and gate/up as another (convert.py splits them), and reads its own RoPE
# settings (partial rotary, LongRoPE) in hf_extras rather than through config.py's RoPE scaling.
FUSED = frozenset({"phi3"})
OWN_ROPE = frozenset({"phi3"})
LONGROPE = ("longrope", "su")


def _phi3_rope(config: Mapping[str, Any], common: Mapping[str, Any]) -> dict[str, Any]:
    """Phi-3/4's partial rotary and LongRoPE from config.json. LongRoPE's short factors are exact up to the
    original context (transformers uses them there; llama.cpp whenever its context is within it): the context is
    capped at that length, since the long factors would change every cached key's rotation past it."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor")) or 1.0
    head_dim = common["head_dim"]
    dims = int(head_dim * float(partial))
    out: dict[str, Any] = {"rope_dims": 0 if dims == head_dim else dims}
    if rope.get("rope_type", rope.get("type")) in LONGROPE:
        original = int(rope.get("original_max_position_embeddings") or config["original_max_position_embeddings"])
        factor = float(rope.get("factor") or common["max_context"] / original)
        attn = rope.get("attention_factor")
        if attn is None:
            attn = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        out.update(rope_factors=tuple(float(x) for x in rope["short_factor"]), rope_attn_factor=float(attn),
                   max_context=min(common["max_context"], original))
    return out
# HF's Gemma RMSNorm multiplies by (1 + w); its checkpoints store w (GGUF files store 1 + w).
HF_NORM_OFFSET = {"gemma2": 1.0, "gemma3": 1.0}
GEMMA = ("gemma2", "gemma3")


def _windows(layers: int, window: int, types: Any, pattern: Callable[[int], bool]) -> tuple[int, ...]:
    """Each layer's sliding window (0 = global) from HF's layer_types, else the family's fixed pattern."""
    if types is not None:
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    return tuple(window if pattern(i) else 0 for i in range(layers))


def _gemma_query_dim(hidden: int, heads: int, head_dim: int, layers: int, big_layers: int) -> int:
    """llama.cpp scales Gemma's queries by 1/sqrt(hidden / heads) for the 27B models (46 layers in Gemma 2, 62 in
    Gemma 3), whose query_pre_attn_scalar is that and not their head_dim; by 1/sqrt(head_dim) at every other size."""
    return hidden // heads if layers == big_layers else head_dim


def hf_extras(arch: str, config: Mapping[str, Any], common: Mapping[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields by which `arch` differs from Llama, from its config.json (only keys support.py
    lists as honoured)."""
    layers, hidden, head_dim = common["num_layers"], common["hidden_size"], common["head_dim"]
    if arch == "qwen2":
        return {"qkv_bias": True}
    if arch == "qwen3":
        return {"qk_norm": "head"}
    if arch in MOE:
        # transformers 5 writes every family's count as num_local_experts; released Qwen3-MoE / OLMoE configs
        # say num_experts.
        experts = config.get("num_local_experts") or config.get("num_experts")
        moe = {"num_experts": int(experts), "experts_used": int(config["num_experts_per_tok"]),
               "expert_ffn_size": int(config.get("moe_intermediate_size") or common["ffn_size"]),
               "expert_norm": bool(config.get("norm_topk_prob", HF_EXPERT_NORM.get(arch, True)))}
        if arch == "qwen3moe":
            return {**moe, "qk_norm": "head"}
        if arch == "olmoe":
            return {**moe, "qk_norm": "full"}
        window = config.get("sliding_window")
        return {**moe, "layer_windows": (int(window),) * layers} if window else moe
    if arch in ("mistral", "phi3"):
        window = config.get("sliding_window")
        extras = {"layer_windows": (int(window),) * layers} if window else {}
        return {**extras, **_phi3_rope(config, common)} if arch == "phi3" else extras
    if arch == "smollm3":
        rope = config.get("no_rope_layers")  # 1: the layer uses RoPE (transformers' naming)
        return {"rope_layers": tuple(bool(x) for x in rope)} if rope is not None else {}
    if arch == "granite":
        return {"embed_scale": float(config.get("embedding_multiplier", 1.0)),
                "query_scale": float(config.get("attention_multiplier") or 0.0),
                "residual_scale": float(config.get("residual_multiplier", 1.0)),
                "logit_scale": 1.0 / float(config.get("logits_scaling", 1.0))}
    if arch == "olmo2":
        return {"norms": "post", "qk_norm": "full"}
    if arch in GEMMA:
        window = int(config.get("sliding_window") or 4096)
        # Gemma 2 alternates local and global layers from the first; Gemma 3 has five local, then a global one.
        period = 2 if arch == "gemma2" else int(config.get("sliding_window_pattern", 6))
        return {
            "layer_windows": _windows(layers, window, config.get("layer_types"), lambda i: (i + 1) % period != 0),
            "query_scale": float(config.get("query_pre_attn_scalar", head_dim)) ** -0.5,
            "embed_scale": float(hidden) ** 0.5,
            "activation": "gelu_tanh",
            "qk_norm": "head" if arch == "gemma3" else "",
            "norms": "sandwich",
            "attn_softcap": float(config.get("attn_logit_softcapping") or 0.0),
            "final_softcap": float(config.get("final_logit_softcapping") or 0.0),
        }
    return {}


def gguf_extras(arch: str, get: Callable[..., Any], common: Mapping[str, Any]) -> dict[str, Any]:
    """The same from a GGUF file's `{arch}.*` metadata (`get(key, default, kind)`), with the constants llama.cpp
    hard-codes per architecture."""
    layers, hidden, heads = common["num_layers"], common["hidden_size"], common["num_heads"]
    extras: dict[str, Any] = {}
    if arch in GGUF_EXPERT_NORM and get("expert_count", 0):
        extras = {"num_experts": get("expert_count"), "experts_used": get("expert_used_count"),
                  "expert_ffn_size": get("expert_feed_forward_length", common["ffn_size"]),
                  "expert_norm": GGUF_EXPERT_NORM[arch]}
        if arch == "llama":
            extras["arch"] = "mixtral"
    if arch == "qwen3moe":
        return {**extras, "qk_norm": "head"}
    if arch == "olmoe":
        return {**extras, "qk_norm": "full"}
    if arch == "llama":
        return extras
    if arch == "phi3":  # llama.cpp's rope_factors_short and attn_factor: loading/loader.py gguf_config
        dims = get("rope.dimension_count", common["head_dim"])
        window = get("attention.sliding_window", 0)
        # llama.cpp runs Phi-3 without its sliding window (a logged TODO of its own); transformers, the model's
        # definition, with it: corejax keeps it (it differs from llama.cpp only past the window, 2047 tokens).
        return {"rope_dims": 0 if dims == common["head_dim"] else dims,
                **({"layer_windows": (window,) * layers} if 0 < window < common["max_context"] else {})}
    if arch == "qwen2":
        return {"qkv_bias": True}
    if arch == "qwen3":
        return {"qk_norm": "head"}
    if arch == "smollm3":  # llama.cpp's smollm3: every fourth layer without RoPE (n_no_rope_layer_step = 4)
        return {"rope_layers": tuple((i + 1) % 4 != 0 for i in range(layers))}
    if arch == "granite":
        scale = get("attention.scale", 0.0, float)
        return {"embed_scale": get("embedding_scale", 1.0, float), "query_scale": scale,
                "residual_scale": get("residual_scale", 1.0, float),
                "logit_scale": 1.0 / get("logit_scale", 1.0, float)}
    if arch == "olmo2":
        return {"norms": "post", "qk_norm": "full"}
    if arch in GEMMA:
        window = get("attention.sliding_window")
        gemma2 = arch == "gemma2"
        query_dim = _gemma_query_dim(hidden, heads, common["head_dim"], layers, 46 if gemma2 else 62)
        extras = {
            # llama.cpp's and HF's fixed patterns: Gemma 2 local on even layers, Gemma 3 five local then global.
            "layer_windows": tuple(window if (i + 1) % (2 if gemma2 else 6) != 0 else 0 for i in range(layers)),
            "query_scale": query_dim ** -0.5,
            "embed_scale": float(hidden) ** 0.5,
            "activation": "gelu_tanh",
            "qk_norm": "" if gemma2 else "head",
            "norms": "sandwich",
        }
        if gemma2:
            extras.update(attn_softcap=get("attn_logit_softcapping", 0.0, float),
                          final_softcap=get("final_logit_softcapping", 0.0, float))
        else:
            extras["rope_local_theta"] = get("rope.freq_base_swa", 10000.0, float)
        return extras
    return {}
