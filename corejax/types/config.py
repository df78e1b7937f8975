"""Frozen configs with no JAX in them: ModelConfig and EncoderConfig (jit statics, read from GGUF or HF
metadata) and EngineConfig (the KV pool and prefill chunking). Per-request options (SamplingParams,
SpeculativeConfig) live in corejax/types/options.py."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from corejax.types import families, support
from corejax.errors import (
    InvalidParameterError,
    ModelFormatError,
    UnsupportedModelError,
    reads_untrusted,
)

SUPPORTED_ARCHITECTURES = families.ARCHITECTURES
# Upper bounds of a decoder's sizes (the largest open models: 100-200 layers, 16k-wide, 256k vocabularies,
# 1M-token contexts), far enough past them that only a corrupt or hostile file meets them.
_FIELD_LIMITS = {"num_layers": 4096, "num_heads": 4096, "num_kv_heads": 4096, "head_dim": 4096,
                 "hidden_size": 1 << 18, "ffn_size": 1 << 20, "vocab_size": 1 << 23, "max_context": 1 << 26}
# How weights are held: f32 (dequantized at load), native (GGUF blocks kept quantized), int8/int4 (quantized).
# The one home of the weight modes and KV cache types every layer names (Session, CLI, loaders, cache, budget).
DECODER_WEIGHTS = ("f32", "native", "int8", "int4")  # native: a quantized GGUF's blocks kept as they are
ENCODER_WEIGHTS = ("f32", "f16", "bf16")  # f16, bf16: encoders only (loading/encoder.py)
WEIGHT_MODES = ("f32", "f16", "bf16", "native", "int8", "int4")
QUANTIZED_WEIGHTS = ("int8", "int4")  # float checkpoints quantized at load
KV_DTYPES = ("float32", "bf16", "int8", "int4")
QUANTIZED_KV = ("int8", "int4")  # pages of integers with a float32 scale per (token, KV head)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: "linear" (positions / factor) or "llama3" (Llama 3.1's smooth band)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the pure model functions need besides the weights. Changing any field recompiles."""

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    norm_eps: float
    rope_theta: float
    max_context: int
    tie_embeddings: bool = True
    rope_scaling: RopeScaling | None = None
    # One entry per layer: 0 for global attention, else the sliding window length (keys within it, self included).
    layer_windows: tuple[int, ...] = ()
    # RoPE base for sliding-window layers (Gemma 3 uses 1e4 there and rope_theta on global layers).
    rope_local_theta: float | None = None
    query_scale: float = 0.0  # 0 means 1/sqrt(head_dim)
    embed_scale: float = 1.0
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qk_norm: str = ""  # "" none, "head" RMSNorm over each head (Qwen3, Gemma 3), "full" over the projection (OLMo 2)
    norms: str = "pre"  # "pre": norm the block's inputs; "sandwich": also its outputs (Gemma); "post": outputs only
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    qkv_bias: bool = False  # Qwen2's q/k/v projection biases
    residual_scale: float = 1.0  # Granite: each block's output is scaled before it joins the residual stream
    logit_scale: float = 1.0  # Granite: logits times this (1 / logits_scaling)
    # One entry per layer: False where the layer applies no RoPE (SmolLM3's every fourth layer); () = all do.
    rope_layers: tuple[bool, ...] = ()
    # llama.cpp's rope_freqs: per-dimension divisors of the inverse frequencies (its form of Llama 3.1 scaling).
    rope_factors: tuple[float, ...] = ()
    # Partial rotary embeddings (Phi-3/4): RoPE on the first rope_dims of each head, the rest passed through;
    # 0 = the whole head. rope_attn_factor multiplies cos and sin (LongRoPE's attention factor).
    rope_dims: int = 0
    rope_attn_factor: float = 1.0
    # Mixture of experts (Qwen3-MoE, OLMoE, Mixtral): every layer's MLP is `num_experts` gated MLPs of
    # `expert_ffn_size`, a router picking `experts_used` per token by softmax, their weights renormalised to sum 1
    # when `expert_norm`. 0 experts: a dense MLP of ffn_size.
    num_experts: int = 0
    experts_used: int = 0
    expert_ffn_size: int = 0
    expert_norm: bool = True

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.arch!r} is not supported; corejax runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "ffn_size", "max_context"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelFormatError(f"model config field {name} must be a positive integer; got {value!r}")
            if value > _FIELD_LIMITS.get(name, 1 << 24):  # far past any model's; a file's absurd size is refused
                raise ModelFormatError(f"model config field {name} is {value}, more than any model corejax can "
                                       f"hold (at most {_FIELD_LIMITS.get(name, 1 << 24)})")
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ModelFormatError(f"head_dim must be even for RoPE; got {self.head_dim}")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * self.num_layers)
        if not self.rope_layers:
            object.__setattr__(self, "rope_layers", (True,) * self.num_layers)
        if len(self.rope_layers) != self.num_layers:
            raise ModelFormatError(f"{len(self.rope_layers)} RoPE flags given for {self.num_layers} layers")
        if self.rope_dims % 2 or not 0 <= self.rope_dims <= self.head_dim:
            raise ModelFormatError(f"RoPE on {self.rope_dims} dimensions of a {self.head_dim}-dimension head: "
                                   "needs an even count, at most the head's")
        if self.rope_factors and len(self.rope_factors) != self.rotary_dim // 2:
            raise ModelFormatError(f"{len(self.rope_factors)} RoPE frequency factors for {self.rotary_dim} rotated "
                                   f"dimensions; expected {self.rotary_dim // 2}")
        if self.qk_norm not in ("", "head", "full") or self.norms not in ("pre", "sandwich", "post"):
            raise ModelFormatError(f"unknown qk_norm {self.qk_norm!r} or norms {self.norms!r}")
        if len(self.layer_windows) != self.num_layers:
            raise ModelFormatError(
                f"{len(self.layer_windows)} layer windows given for {self.num_layers} layers"
            )
        if self.num_experts and not (0 < self.experts_used <= self.num_experts and self.expert_ffn_size > 0):
            raise ModelFormatError(f"a mixture of {self.num_experts} experts needs 1 to {self.num_experts} experts "
                                   f"per token and an expert size; got {self.experts_used} and {self.expert_ffn_size}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ModelFormatError(f"norm epsilon must be positive and finite; got {self.norm_eps}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ModelFormatError(f"RoPE base must be positive and finite; got {self.rope_theta}")

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the first ones)."""
        return self.rope_dims or self.head_dim

    @property
    def attention_scale(self) -> float:
        return self.query_scale or self.head_dim**-0.5

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], *, tie_embeddings: bool,
                  rope_factors: Sequence[float] | None = None) -> ModelConfig:
        """Reads llama.cpp's `{arch}.*` keys, with the constants llama.cpp hard-codes per architecture
        (types/families.py). rope_factors: the file's rope_freqs tensor, if it has one. A key that needs a feature
        corejax lacks (support.GGUF_FAMILIES) refuses the model."""
        name = meta.get("general.architecture")
        if not isinstance(name, str):
            raise ModelFormatError("the GGUF file has no general.architecture string")
        arch = families.GGUF_ARCH.get(name)
        if arch is None:
            raise UnsupportedModelError(
                f"GGUF architecture {name!r} is not supported; corejax runs {', '.join(families.GGUF_ARCH)}")

        def get(key: str, default: Any = None, kind: type = int) -> Any:
            value = meta.get(f"{name}.{key}", default)
            if value is None:
                raise ModelFormatError(f"the GGUF file lacks the metadata key {name}.{key}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ModelFormatError(f"GGUF key {name}.{key} must be an integer; got {value!r}")
            if kind is float and not isinstance(value, (int, float)):
                raise ModelFormatError(f"GGUF key {name}.{key} must be a number; got {value!r}")
            return kind(value)

        hidden = get("embedding_length")
        heads = get("attention.head_count")
        head_dim = get("attention.key_length", hidden // heads if heads else 0)
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = get("vocab_size", len(tokens) if tokens is not None else None)
        scaling = None
        if meta.get(f"{name}.rope.scaling.type") == "linear":  # the other types are refused below
            scaling = RopeScaling("linear", get("rope.scaling.factor", kind=float))
        common = dict(
            arch=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv", heads),
            head_dim=head_dim,
            ffn_size=get("feed_forward_length"),
            norm_eps=get("attention.layer_norm_rms_epsilon", kind=float),
            rope_theta=get("rope.freq_base", 10000.0, kind=float),
            max_context=get("context_length"),
            tie_embeddings=tie_embeddings,
            rope_scaling=scaling,
            rope_factors=tuple(float(x) for x in rope_factors) if rope_factors is not None else (),
        )
        common.update(families.gguf_extras(arch, get, common))
        support.check_config(support.GGUF_FAMILIES[arch], support.gguf_view(meta, name), "the GGUF metadata")
        return cls(**common)

    @classmethod
    @reads_untrusted("config.json")
    def from_hf(cls, config: Mapping[str, Any], *, bidirectional: bool = False) -> ModelConfig:
        """Reads a transformers config.json; only the keys its family honours are read (support.HF_FAMILIES,
        types/families.py), and a key that needs a feature corejax lacks refuses the model. bidirectional: the
        block run as a sentence encoder (support.HF_BIDIRECTIONAL; EncoderConfig.decoder), never causally."""
        model_type = config.get("model_type")
        families_ = support.HF_BIDIRECTIONAL if bidirectional else support.HF_FAMILIES
        family = families_.get(model_type) if isinstance(model_type, str) else None
        if family is None:
            raise UnsupportedModelError(
                f"HF model_type {model_type!r} is not supported; corejax runs "
                f"{', '.join(t for t, f in support.HF_FAMILIES.items() if f.always is None)} checkpoints")
        arch = family.arch
        if model_type == "gemma3":
            config = config.get("text_config", config)
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            layers = int(config["num_hidden_layers"])
            common = dict(
                arch=arch,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                ffn_size=int(config["intermediate_size"]),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_param(config, "rope_theta", 10000.0)),
                max_context=int(config.get("max_position_embeddings", 4096)),
                tie_embeddings=bool(config.get("tie_word_embeddings", arch in families.GEMMA)),
                rope_scaling=None if arch in families.OWN_ROPE else _hf_rope_scaling(config),
            )
            support.check_config(family, config, "config.json")
            common.update(families.hf_extras(arch, config, common))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, UnsupportedModelError):
                raise
            raise ModelFormatError(f"config.json is missing or has a bad value for {e}") from None
        if arch in families.GEMMA:
            if _hf_rope_scaling(config, "sliding_attention") is not None:
                raise support.refusal("config.json", ["RoPE scaling on Gemma's sliding-window layers"])
            if arch == "gemma3":
                common["rope_local_theta"] = float(_rope_param(config, "rope_local_base_freq", 10000.0,
                                                               "sliding_attention"))
        return cls(**common)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine lays out the KV cache and splits prompts (per Session).

    kv_dtype: "bf16" (the default: half float32's bytes, which decode at a long context reads once per token;
    the parity tests against transformers hold with it) | "float32" | "int8" | "int4" pages (int8/int4
    dequantized inside the attention kernel).
    kv_cache_tokens: the page pool's capacity in tokens, shared by all sequences and the prefix cache;
    None = the model's full context, capped at `kv_cache_max_bytes`.
    prefill_chunk: prompts run through the model in chunks of at most this many tokens, so attention's
    working set stays bounded however long the prompt.
    prefix_cache: reuse the KV pages of earlier prompts that start the same way (off: every prompt is
    computed in full — for measuring prefill).
    max_prefill_stall: seconds one scheduler step's prefill part may delay the sequences already decoding
    (corejax/serving/pacing.py): new prompts run in the largest power-of-two chunks whose measured time fits.
    devices: split the model over this many devices, tensor-parallel (corejax/engine/sharding.py); 1 = one device."""

    page_size: int = 16
    kv_dtype: str = "bf16"
    kv_cache_tokens: int | None = None
    kv_cache_max_bytes: int = 1 << 30
    prefill_chunk: int = 512
    prefix_cache: bool = True
    devices: int = 1
    max_prefill_stall: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.prefix_cache, bool):
            raise InvalidParameterError(f"prefix_cache must be True or False; got {self.prefix_cache!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise InvalidParameterError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}; got {self.kv_dtype!r}")
        for name in ("page_size", "prefill_chunk", "kv_cache_max_bytes", "devices"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidParameterError(f"{name} must be a positive integer; got {value!r}")
        if isinstance(self.max_prefill_stall, bool) or not isinstance(self.max_prefill_stall, (int, float)) \
                or not self.max_prefill_stall > 0:
            raise InvalidParameterError(
                f"max_prefill_stall must be a positive number of seconds; got {self.max_prefill_stall!r}")
        if self.kv_cache_tokens is not None and (not isinstance(self.kv_cache_tokens, int)
                                                 or self.kv_cache_tokens < self.page_size):
            raise InvalidParameterError(
                f"kv_cache_tokens must be an integer >= page_size ({self.page_size}); got {self.kv_cache_tokens!r}")

    def kv_bytes_per_token(self, cfg: ModelConfig) -> float:
        per_value = {"float32": 4, "bf16": 2, "int8": 1, "int4": 0.5}[self.kv_dtype]
        scales = 4 if self.kv_dtype in QUANTIZED_KV else 0  # one f32 per (token, kv head)
        return 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim * per_value + scales)

    def num_pages(self, cfg: ModelConfig) -> int:
        """Pages in the pool (page 0, the padding target, included)."""
        tokens = self.kv_cache_tokens
        if tokens is None:
            tokens = min(cfg.max_context, int(self.kv_cache_max_bytes // self.kv_bytes_per_token(cfg)))
        return max(2, -(-tokens // self.page_size) + 1)


def _rope_param(config: Mapping[str, Any], key: str, default: float, layer_type: str = "full_attention") -> Any:
    """transformers 5 nests RoPE settings in rope_parameters (per layer type for Gemma 3); 4.x kept them flat."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):
        params = params.get(layer_type, params)
        if isinstance(params, Mapping) and "rope_theta" in params:
            return params["rope_theta"]
    return config.get(key, default)


def _hf_rope_scaling(config: Mapping[str, Any], layer_type: str = "full_attention") -> RopeScaling | None:
    """The RoPE scaling of `layer_type` layers: transformers 4.x's flat rope_scaling (global layers only where
    the family has sliding ones), or 5.x's rope_parameters (per layer type for Gemma 3)."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):
        scaling = params.get(layer_type, params if "full_attention" not in params else None)
    else:
        scaling = config.get("rope_scaling") if layer_type == "full_attention" else None
    if not isinstance(scaling, Mapping):
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in support.HF_ROPE_TYPES:
        raise support.refusal("config.json", [f"{kind!r} RoPE scaling ({', '.join(support.HF_ROPE_TYPES[1:])} "
                                              "are implemented)"])
    factor = scaling.get("partial_rotary_factor")
    if factor is not None and float(factor) != 1.0:
        raise support.refusal("config.json", [f"partial rotary embeddings (partial_rotary_factor = {factor!r})"])
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(scaling["factor"]))
    return RopeScaling(  # llama3, the last of support.HF_ROPE_TYPES
        "llama3",
        float(scaling["factor"]),
        float(scaling.get("low_freq_factor", 1.0)),
        float(scaling.get("high_freq_factor", 4.0)),
        int(scaling.get("original_max_position_embeddings", 8192)),
    )


# Temperatures below this are greedy; vLLM uses the same epsilon.
ENCODER_MODEL_TYPES = tuple(support.ENCODER_FAMILIES)
_ENCODER_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@reads_untrusted("config.json")
def is_encoder_config(config: Mapping[str, Any]) -> bool:
    """Whether a transformers config.json describes an encoder corejax runs (BERT, MPNet, or a decoder family
    run bidirectionally: EmbeddingGemma)."""
    return config.get("model_type") in ENCODER_MODEL_TYPES or is_bidirectional_decoder(config)


@reads_untrusted("config.json")
def is_bidirectional_decoder(config: Mapping[str, Any]) -> bool:
    """A decoder family's config with use_bidirectional_attention: true (EmbeddingGemma): an encoder whose layers
    are that family's block (EncoderConfig.decoder), never a causal decoder."""
    return config.get("model_type") in support.HF_BIDIRECTIONAL and config.get("use_bidirectional_attention") is True


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """A BERT-family encoder (models/bert.py): post-norm layers, learned absolute positions, optional
    sequence-classification head; MPNet is BERT with the three differences below as data. A jit static like
    ModelConfig: changing any field recompiles."""

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_size: int
    max_context: int  # tokens a sequence may hold (learned position rows past position_padding_idx)
    type_vocab_size: int = 2  # 0: no token-type embeddings (MPNet)
    # None: positions 0..T-1 (BERT). An index p (MPNet, RoBERTa: fairseq's make_positions): real tokens are
    # numbered p+1, p+2, ..., tokens whose id is p sit at row p.
    position_padding_idx: int | None = None
    relative_buckets: int = 0  # > 0: T5-style bidirectional relative position bias added to every layer's scores
    relative_max_distance: int = 128  # distances past this share the last bucket
    norm_eps: float = 1e-12
    activation: str = "gelu"  # "gelu" (erf, BERT's), "gelu_tanh" or "relu"
    labels: tuple[str, ...] = ()  # id2label of a *ForSequenceClassification head; () for a bare encoder
    multi_label: bool = False  # problem_type == "multi_label_classification": sigmoid per label, not softmax
    # A decoder family's block run bidirectionally (EmbeddingGemma): its ModelConfig, read by models.forward with
    # engine/cache.py BidirectionalAttention; the fields above then only describe it (sizes for the budget).
    decoder: ModelConfig | None = None

    @property
    def head_dim(self) -> int:
        return self.decoder.head_dim if self.decoder is not None else self.hidden_size // self.num_heads

    @classmethod
    def from_decoder(cls, cfg: ModelConfig) -> EncoderConfig:
        """The encoder that runs `cfg`'s block bidirectionally (ModelConfig.from_hf(..., bidirectional=True))."""
        return cls(arch=cfg.arch, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                   num_heads=cfg.num_heads, ffn_size=cfg.ffn_size, max_context=cfg.max_context, type_vocab_size=0,
                   norm_eps=cfg.norm_eps, activation=cfg.activation, decoder=cfg)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @classmethod
    @reads_untrusted("config.json")
    def from_hf(cls, config: Mapping[str, Any], *, with_head: bool) -> EncoderConfig:
        """Reads a transformers BERT or MPNet config.json; `with_head` when the checkpoint carries classifier
        weights."""
        if not is_encoder_config(config):
            raise UnsupportedModelError(f"HF model_type {config.get('model_type')!r} is not an encoder corejax runs "
                                        f"({', '.join(ENCODER_MODEL_TYPES)})")
        if is_bidirectional_decoder(config):
            return cls.from_decoder(ModelConfig.from_hf(config, bidirectional=True))
        act = config.get("hidden_act", "gelu")
        if act not in _ENCODER_ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported; corejax's encoder runs "
                                        f"{', '.join(_ENCODER_ACTIVATIONS)}")
        support.check_config(support.ENCODER_FAMILIES[config["model_type"]], config, "config.json")
        labels: tuple[str, ...] = ()
        try:
            if with_head:
                id2label = config.get("id2label") or {}
                n = int(config.get("num_labels") or len(id2label) or 2)
                labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n))
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            if hidden % heads:
                raise ModelFormatError(f"config.json: hidden_size {hidden} is not a multiple of {heads} heads")
            arch = config["model_type"]
            mpnet = arch == "mpnet"
            padding_idx = 1 if mpnet else None  # transformers' MPNetEmbeddings fixes it at 1, whatever pad_token_id
            rows = int(config.get("max_position_embeddings", 514 if mpnet else 512))
            return cls(
                arch=arch,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                ffn_size=int(config["intermediate_size"]),
                max_context=rows - (0 if padding_idx is None else padding_idx + 1),
                type_vocab_size=0 if mpnet else int(config.get("type_vocab_size", 2)),
                position_padding_idx=padding_idx,
                relative_buckets=int(config.get("relative_attention_num_buckets", 32)) if mpnet else 0,
                norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                activation=_ENCODER_ACTIVATIONS[act],
                labels=labels,
                multi_label=with_head and config.get("problem_type") == "multi_label_classification",
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ModelFormatError):
                raise
            raise ModelFormatError(f"config.json is missing or has a bad value for {e}") from None
