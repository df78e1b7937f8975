"""What corejax computes of each checkpoint family, as data: the config keys it honours, the keys whose other
values need a feature it lacks, and the tensors it may leave unread. No JAX; config.py and loading/ use it.

A checkpoint that needs something corejax does not implement is refused with UnsupportedModelError naming
the feature, never run without it: a Qwen2 folder once loaded as Llama with its q/k/v biases dropped, and
its chosen tokens' logprobs were up to 4.25 away from transformers'. Config keys in none of these tables are
ones the computation never reads (token ids, dtypes, dropout, initializer ranges) and pass; every tensor a
file holds must be read or allowed here by name, as llama.cpp refuses a file with tensors it did not load.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any

from corejax.errors import UnsupportedModelError

Check = Callable[[Any, Mapping[str, Any]], bool]


@dataclasses.dataclass(frozen=True)
class Unimplemented:
    """A config key whose value needs `feature` unless `ok(value, config)`; an absent key always passes (the
    reference's default is what corejax computes). `feature` may name the value as {value}."""

    key: str
    feature: str
    ok: Check

    def holds(self, config: Mapping[str, Any]) -> bool:
        try:
            return self.key not in config or bool(self.ok(config[self.key], config))
        except (TypeError, ValueError, LookupError, ArithmeticError):  # a value of a shape nobody expects: refuse
            return False

    def describe(self, config: Mapping[str, Any]) -> str:
        value = _short(config[self.key])
        return f"{self.feature.format(value=value)} ({self.key} = {value})"


@dataclasses.dataclass(frozen=True)
class Family:
    """One checkpoint family: the corejax architecture it runs as, the config keys ModelConfig/EncoderConfig
    read (tests/test_refusals.py holds them to it), the keys that need an unimplemented feature, and a feature
    every checkpoint of the family needs (None: none), which refuses the family outright until it exists."""

    arch: str
    honoured: frozenset[str]
    unimplemented: tuple[Unimplemented, ...] = ()
    always: str | None = None


def _is(*values: Any) -> Check:
    """ok when the value is null or one of `values` (the settings that compute what corejax computes); a flag
    is compared by identity, so 1 does not pass for True nor 0 for False."""
    allowed = (None, *values)

    def ok(value: Any, config: Mapping[str, Any]) -> bool:
        if value is None or isinstance(value, bool):
            return any(value is v for v in allowed)
        return any(v is not None and not isinstance(v, bool) and value == v for v in allowed)

    return ok


def _only(*values: str) -> Check:
    """ok when every entry of a list value is one of `values` (per-layer settings such as layer_types)."""
    return lambda value, config: value is None or all(v in values for v in value)


def _gguf_window_inert(value: Any, config: Mapping[str, Any]) -> bool:
    return value is None or value == 0 or int(value) >= int(config["context_length"])


def _gguf_head_dim(config: Mapping[str, Any]) -> int:
    """What ModelConfig.from_gguf takes as head_dim (key_length, else embedding_length / head_count)."""
    return int(config.get("attention.key_length") or config["embedding_length"] // config["attention.head_count"])


def _equals_head_dim(value: Any, config: Mapping[str, Any]) -> bool:
    return value is None or int(value) == _gguf_head_dim(config)


# ---- HF config.json (ModelConfig.from_hf, EncoderConfig.from_hf) ----

_HF_SIZES = frozenset({
    "model_type", "vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
    "max_position_embeddings", "tie_word_embeddings",
})
# Other families' keys, which transformers' Llama would ignore too: on a llama-type config they mean a
# mislabelled checkpoint whose real computation has the feature, so they refuse rather than pass.
_HF_LLAMA = (
    Unimplemented("attention_bias", "attention projection biases", _is(False)),
    Unimplemented("mlp_bias", "MLP projection biases", _is(False)),
    Unimplemented("hidden_act", "the activation {value} (corejax's Llama MLP is SwiGLU: silu)", _is("silu")),
    Unimplemented("partial_rotary_factor", "partial rotary embeddings", _is(1.0)),
    Unimplemented("use_qk_norm", "Q/K normalization", _is(False)),
    Unimplemented("qk_layernorm", "Q/K normalization", _is(False)),
    Unimplemented("no_rope_layers", "layers without RoPE (SmolLM3)", lambda v, c: v is None or all(x == 1 for x in v)),
    Unimplemented("logits_scaling", "Granite's logit scaling", _is(1.0)),
    Unimplemented("embedding_multiplier", "Granite's embedding multiplier", _is(1.0)),
    Unimplemented("residual_multiplier", "Granite's residual multiplier", _is(1.0)),
    Unimplemented("attention_multiplier", "Granite's attention multiplier", _is()),
    Unimplemented("attn_logit_softcapping", "attention logit soft-capping on a Llama", _is(0.0)),
    Unimplemented("final_logit_softcapping", "final logit soft-capping on a Llama", _is(0.0)),
)
_GEMMA3_KEYS = _HF_SIZES | {
    "text_config", "sliding_window", "layer_types", "sliding_window_pattern", "rope_local_base_freq",
    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
}
_GEMMA3 = Family("gemma3", _GEMMA3_KEYS, (
    Unimplemented("attention_bias", "attention projection biases", _is(False)),
    # gelu_new is the same tanh approximation under another name.
    Unimplemented("hidden_activation", "the activation {value} (corejax's Gemma MLP is GeGLU: gelu_pytorch_tanh)",
                  _is("gelu_pytorch_tanh", "gelu_new")),
    # EmbeddingGemma: never run causally; loading/loader.py routes such a folder to the encoder runtime, which
    # reads it through HF_BIDIRECTIONAL below.
    Unimplemented("use_bidirectional_attention", "bidirectional attention in a generative model (EmbeddingGemma "
                  "runs as an embedding model: Session.embed)", _is(False)),
    Unimplemented("layer_types", "attention layer types other than sliding_attention and full_attention",
                  _only("sliding_attention", "full_attention")),
))

def _without(unimplemented: tuple[Unimplemented, ...], *keys: str) -> tuple[Unimplemented, ...]:
    """A family's refusals less those of the keys it honours."""
    return tuple(u for u in unimplemented if u.key not in keys)


# Qwen's and SmolLM3's configs carry sliding-window settings their released models leave off.
_HF_NO_WINDOW = (
    Unimplemented("use_sliding_window", "sliding-window attention", _is(False)),
    Unimplemented("layer_types", "sliding-window attention layers", _only("full_attention")),
)
_GRANITE_KEYS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")
_GEMMA2 = Family("gemma2", _GEMMA3_KEYS - {"rope_local_base_freq", "sliding_window_pattern", "text_config"},
                 _GEMMA3.unimplemented)

_HF_QWEN3_MOE = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")
_HF_MOE = (
    Unimplemented("decoder_sparse_step", "dense MLP layers between the expert layers", _is(1)),
    Unimplemented("mlp_only_layers", "dense MLP layers between the expert layers", lambda v, c: not v),
    Unimplemented("shared_expert_intermediate_size", "a shared expert", _is(0)),
)

HF_FAMILIES: dict[str, Family] = {
    "llama": Family("llama", _HF_SIZES, _HF_LLAMA),
    "mistral": Family("mistral", _HF_SIZES | {"sliding_window"}, _HF_LLAMA),
    # Qwen2's config has no attention_bias key: its attention adds q/k/v biases unconditionally.
    "qwen2": Family("qwen2", _HF_SIZES, _HF_LLAMA + _HF_NO_WINDOW),
    "qwen3": Family("qwen3", _HF_SIZES, _HF_LLAMA + _HF_NO_WINDOW),
    "smollm3": Family("smollm3", _HF_SIZES | {"no_rope_layers", "no_rope_layer_interval"},
                      _without(_HF_LLAMA, "no_rope_layers") + _HF_NO_WINDOW),
    "granite": Family("granite", _HF_SIZES | set(_GRANITE_KEYS), _without(_HF_LLAMA, *_GRANITE_KEYS)),
    "olmo2": Family("olmo2", _HF_SIZES, _HF_LLAMA),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA3,
    "gemma3": _GEMMA3,  # the multimodal wrapper: ModelConfig.from_hf reads its text_config
    "qwen3_moe": Family("qwen3moe", _HF_SIZES | set(_HF_QWEN3_MOE), _HF_LLAMA + _HF_NO_WINDOW + _HF_MOE),
    "olmoe": Family("olmoe", _HF_SIZES | {"num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob"},
                    _HF_LLAMA + (
        Unimplemented("clip_qkv", "clipped Q/K/V projections", _is()),)),
    "mixtral": Family("mixtral", _HF_SIZES | {"sliding_window", "num_local_experts", "num_experts_per_tok"},
                      _HF_LLAMA),
    "phi3": Family("phi3", _HF_SIZES | {"sliding_window", "partial_rotary_factor", "original_max_position_embeddings"},
                   _without(_HF_LLAMA, "partial_rotary_factor") + (
        Unimplemented("rope_parameters", "{value} RoPE (default and longrope are implemented for Phi-3)",
                      lambda v, c: v is None or v.get("rope_type", v.get("type", "default")) in ("default", "longrope", "su")),
        Unimplemented("rope_scaling", "{value} RoPE (default and longrope are implemented for Phi-3)",
                      lambda v, c: v is None or v.get("rope_type", v.get("type", "default")) in ("default", "longrope", "su")),
    )),
}

# Decoder families run as sentence encoders (use_bidirectional_attention: true): the same block and keys, every
# layer's attention bidirectional (engine/cache.py BidirectionalAttention); ModelConfig.from_hf(bidirectional=True).
HF_BIDIRECTIONAL: dict[str, Family] = {
    "gemma3_text": Family("gemma3", _GEMMA3_KEYS | {"use_bidirectional_attention"},
                          _without(_GEMMA3.unimplemented, "use_bidirectional_attention")),
}

ENCODER_FAMILIES: dict[str, Family] = {
    "bert": Family("bert", frozenset({
        "model_type", "vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
        "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act", "id2label", "num_labels",
        "problem_type",
    }), (
        Unimplemented("position_embedding_type",
                      "{value} position embeddings (corejax's BERT adds learned absolute ones)", _is("absolute")),
        Unimplemented("is_decoder", "causal (decoder) attention in an encoder", _is(False)),
        Unimplemented("add_cross_attention", "cross-attention", _is(False)),
    )),
    "mpnet": Family("mpnet", frozenset({
        "model_type", "vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
        "max_position_embeddings", "layer_norm_eps", "hidden_act", "relative_attention_num_buckets",
    }), (
        # transformers' MPNetEncoder sizes the bias table from the config but buckets with 32 whatever it says
        Unimplemented("relative_attention_num_buckets",
                      "{value} relative-attention buckets (transformers' MPNet buckets distances into 32)", _is(32)),
    )),
}

# RoPE types of HF's rope_scaling / rope_parameters that models/layers.py rope_inv_freq computes.
HF_ROPE_TYPES = ("default", "linear", "llama3")

# ---- GGUF metadata (ModelConfig.from_gguf), keys after the `{arch}.` prefix ----

_GGUF_SIZES = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.key_length", "attention.layer_norm_rms_epsilon", "rope.freq_base",
    "rope.scaling.type", "rope.scaling.factor", "vocab_size",
})
_GGUF_COMMON = (
    Unimplemented("rope.scaling.type", "{value} RoPE scaling (linear is implemented)", _is("none", "linear")),
    Unimplemented("rope.scaling.attn_factor", "a RoPE attention factor", _is(1.0)),
    Unimplemented("rope.dimension_count", "partial rotary embeddings (RoPE on {value} dimensions of each head)",
                  _equals_head_dim),
    Unimplemented("attention.value_length", "value heads of another size ({value}) than the key heads",
                  _equals_head_dim),
    Unimplemented("expert_count", "mixture-of-experts layers", _is(0)),
    Unimplemented("attention.causal", "non-causal attention", _is(True)),
    Unimplemented("attention.clamp_kqv", "clamped Q/K/V projections", _is(0.0)),
    Unimplemented("use_parallel_residual", "parallel attention and MLP residuals", _is(False)),
    # llama.cpp's attention.scale 0 means 1/sqrt(head_dim), what corejax uses.
    Unimplemented("attention.scale", "an attention scale other than 1/sqrt(head_dim)", _is(0.0)),
    Unimplemented("logit_scale", "a logit scale (Granite)", _is(1.0)),
    Unimplemented("embedding_scale", "an embedding scale (Granite)", _is(1.0)),
    Unimplemented("residual_scale", "a residual scale (Granite)", _is(1.0)),
    Unimplemented("attn_logit_softcapping", "attention logit soft-capping", _is(0.0)),
    Unimplemented("final_logit_softcapping", "final logit soft-capping", _is(0.0)),
)
_GGUF_WINDOW = (Unimplemented("attention.sliding_window", "sliding-window attention", _gguf_window_inert),)
_GGUF_GRANITE = ("attention.scale", "embedding_scale", "residual_scale", "logit_scale")
_GGUF_SOFTCAP = ("attn_logit_softcapping", "final_logit_softcapping")
# Mixture of experts as llama.cpp's llama (Mixtral), qwen3moe and olmoe run it: softmax routing to
# expert_used_count experts, renormalised or not as the architecture fixes (types/families.py GGUF_EXPERT_NORM).
_GGUF_MOE_KEYS = ("expert_count", "expert_used_count", "expert_feed_forward_length")


def _gguf_moe(norm: bool) -> tuple[Unimplemented, ...]:
    return (
        Unimplemented("expert_weights_norm", f"{'un' if norm else ''}normalised expert weights", _is(norm)),
        Unimplemented("expert_weights_scale", "scaled expert weights", _is(0.0, 1.0)),
        Unimplemented("expert_gating_func", "expert gating other than softmax", _is(0, 1)),
        Unimplemented("expert_shared_count", "shared experts", _is(0)),
        Unimplemented("expert_shared_feed_forward_length", "shared experts", _is(0)),
        Unimplemented("expert_group_count", "grouped expert routing", _is(0, 1)),
        Unimplemented("leading_dense_block_count", "dense MLP layers before the expert layers", _is(0)),
    )


_GGUF_MOE_COMMON = _without(_GGUF_COMMON, "expert_count")
GGUF_FAMILIES: dict[str, Family] = {
    **{arch: Family(arch, _GGUF_SIZES, _GGUF_COMMON + _GGUF_WINDOW) for arch in ("qwen2", "qwen3", "smollm3", "olmo2")},
    "llama": Family("llama", _GGUF_SIZES | set(_GGUF_MOE_KEYS), _GGUF_MOE_COMMON + _GGUF_WINDOW + _gguf_moe(True)),
    "qwen3moe": Family("qwen3moe", _GGUF_SIZES | set(_GGUF_MOE_KEYS),
                       _GGUF_MOE_COMMON + _GGUF_WINDOW + _gguf_moe(True)),
    "olmoe": Family("olmoe", _GGUF_SIZES | set(_GGUF_MOE_KEYS), _GGUF_MOE_COMMON + _GGUF_WINDOW + _gguf_moe(False)),
    # Phi-3: partial rotary, LongRoPE's short factors with its attention factor, its sliding window.
    "phi3": Family("phi3", _GGUF_SIZES | {"rope.dimension_count", "rope.scaling.attn_factor",
                                          "rope.scaling.original_context_length", "attention.sliding_window"},
                   _without(_GGUF_COMMON, "rope.dimension_count", "rope.scaling.attn_factor")),
    "granite": Family("granite", _GGUF_SIZES | set(_GGUF_GRANITE),
                      _without(_GGUF_COMMON, *_GGUF_GRANITE) + _GGUF_WINDOW),
    "gemma2": Family("gemma2", _GGUF_SIZES | {"attention.sliding_window", *_GGUF_SOFTCAP},
                     _without(_GGUF_COMMON, *_GGUF_SOFTCAP)),
    "gemma3": Family("gemma3", _GGUF_SIZES | {"attention.sliding_window", "rope.freq_base_swa"}, _GGUF_COMMON),
}


def gguf_view(meta: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """The `{arch}.*` metadata keys without the prefix (the names GGUF_FAMILIES uses)."""
    prefix = f"{arch}."
    return {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}


def check_config(family: Family, config: Mapping[str, Any], where: str) -> None:
    """Raises UnsupportedModelError naming every feature `config` needs that corejax lacks."""
    found = [family.always] if family.always else []
    found += [u.describe(config) for u in family.unimplemented if not u.holds(config)]
    if found:
        raise refusal(where, found)


def refusal(where: str, features: list[str]) -> UnsupportedModelError:
    them = "them" if len(features) > 1 else "it"
    return UnsupportedModelError(
        f"{where}: this model needs {'; '.join(features)}, which corejax does not implement yet; running it "
        f"without {them} would compute something else, so it is refused. Use a checkpoint without {them}, or run "
        "this one with transformers or llama.cpp")


# ---- tensors a loader may leave unread: (name pattern, why the reference computes the same without it) ----

HF_DECODER_UNREAD = (
    (r"(.+\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
     "a buffer older transformers saved; corejax and transformers both recompute it from the config"),
    (r"(model\.)?(vision_tower|multi_modal_projector)\..+",
     "a multimodal Gemma 3's image encoder: corejax takes text only, and text-only prompts never reach it"),
)
ENCODER_UNREAD = (
    (r"((bert|mpnet|model)\.)?pooler\.dense\.(weight|bias)",
     "BERT's pooler (a tanh layer on the CLS state): sentence-transformers pools the token states without it; "
     "a classifier checkpoint's pooler is read"),
    (r"((bert|mpnet|model)\.)?embeddings\.position_ids",
     "the arange(max_position) buffer older transformers saved; positions are computed either way"),
    (r"cls\..+", "BERT's pre-training heads (masked LM, next sentence), which act after the encoder's output"),
    (r"lm_head\..+", "MPNet's masked-LM head, which acts after the encoder's output"),
)
GGUF_UNREAD: tuple[tuple[str, str], ...] = ()

# What an unread tensor's name suggests it computes, for the message.
TENSOR_HINTS = (
    (r".*\.bias", "biases"),
    (r"rope_freqs\..*", "RoPE frequency factors (llama.cpp's form of Llama 3.1 RoPE scaling)"),
    (r".*(_exps|\.experts\.|_inp).*", "mixture-of-experts layers"),
)
_SHOWN = 4  # unread names quoted in the message


def check_unread_tensors(names: Iterable[str], read: Container[str], allowed: tuple[tuple[str, str], ...],
                         where: str) -> None:
    """Raises UnsupportedModelError naming the tensors of `names` that are neither read nor `allowed`."""
    patterns = [re.compile(p) for p, _ in allowed]
    unread = [n for n in names if n not in read and not any(p.fullmatch(n) for p in patterns)]
    if not unread:
        return
    shown = ", ".join(repr(n[:80]) for n in unread[:_SHOWN]) + (", ..." if len(unread) > _SHOWN else "")
    hints = [h for p, h in TENSOR_HINTS if any(re.fullmatch(p, n) for n in unread)]
    what = f" ({', '.join(hints)})" if hints else ""
    raise UnsupportedModelError(
        f"{where}: {len(unread)} tensor{'s' if len(unread) > 1 else ''} that corejax's model does not read: "
        f"{shown}{what}. corejax does not implement what they compute yet, and ignoring them would compute "
        "something else, so the model is refused. Use a checkpoint without them, or run this one with "
        "transformers or llama.cpp")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
