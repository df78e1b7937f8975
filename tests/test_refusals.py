"""Nothing computes the wrong thing silently: a checkpoint that needs a feature corejax lacks (a config key
it does not implement, a tensor it would not read) is refused with UnsupportedModelError naming it, and the
checkpoints it does run still load and match transformers."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
from references import require
from tiny_model import write_tiny_llama

torch = require("torch")
transformers = require("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from corejax.types import support  # noqa: E402
from corejax.types.config import EncoderConfig, ModelConfig  # noqa: E402
from corejax.engine.programs import full_logits  # noqa: E402
from corejax.errors import ModelFormatError, UnsupportedModelError  # noqa: E402
from corejax.hub import ModelSource  # noqa: E402
from corejax.loading.convert import load_hf_folder  # noqa: E402
from corejax.loading.loader import load_model  # noqa: E402

VOCAB = 96
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _save(model, folder):
    with torch.no_grad():  # biases and norms start at 0/1: randomise, so a dropped one changes the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _build(config_class, folder, **overrides):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**{**SIZES, **overrides})).eval()
    return model, _save(model, folder)


def _logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _edit_tensors(folder, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_qwen2_weights_under_a_llama_config_are_refused_by_their_tensors(tmp_path):
    """The tensor check alone catches the biases: the same weights labelled llama."""
    _, folder = _build(transformers.Qwen2Config, tmp_path)
    _edit_config(folder, model_type="llama")
    with pytest.raises(UnsupportedModelError) as e:
        load_hf_folder(folder, progress=False)
    message = str(e.value)
    assert "6 tensors" in message and "'model.layers.0.self_attn.q_proj.bias'" in message
    assert "(biases)" in message and ", ..." in message and len(message) < 700


def test_mistral_sliding_window_is_honoured(tmp_path):
    _, folder = _build(transformers.MistralConfig, tmp_path, sliding_window=8)
    cfg, _, _ = load_hf_folder(folder, progress=False)
    assert cfg.layer_windows == (8, 8)  # tests/test_families.py checks the logits against transformers'


def test_mistral_without_a_window_loads_and_matches_transformers(tmp_path):
    model, folder = _build(transformers.MistralConfig, tmp_path, sliding_window=None)
    cfg, params, _ = load_hf_folder(folder, progress=False)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(2, 20)).astype(np.int32)
    ours, ref = np.asarray(full_logits(params, ids, cfg=cfg)), _logits(model, ids)
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert cfg.layer_windows == (0, 0)


@pytest.fixture
def llama_folder(tmp_path):
    return _build(transformers.LlamaConfig, tmp_path)[1]


def test_unknown_tensor_in_hf_folder_is_refused(llama_folder):
    _edit_tensors(llama_folder, lambda t: t.update({"model.layers.1.mlp.gate_proj.scale": np.ones(48, np.float32)}))
    with pytest.raises(UnsupportedModelError, match=r"1 tensor that corejax's model does not read: "
                                                    r"'model.layers.1.mlp.gate_proj.scale'"):
        load_hf_folder(llama_folder, progress=False)


def test_llama_attention_bias_tensor_is_refused(llama_folder):
    _edit_tensors(llama_folder, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.ones(32, np.float32)}))
    with pytest.raises(UnsupportedModelError, match=r"'model.layers.0.self_attn.q_proj.bias' \(biases\)"):
        load_hf_folder(llama_folder, progress=False)


def test_stored_rotary_inv_freq_is_allowed(llama_folder):
    """Older transformers saved this buffer; both sides recompute it from the config."""
    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
    _edit_tensors(llama_folder, lambda t: t.update(inv_freq))
    cfg, _, _ = load_hf_folder(llama_folder, progress=False)
    assert cfg.arch == "llama"


def test_tied_config_with_a_different_stored_head_is_refused(tmp_path):
    _, folder = _build(transformers.LlamaConfig, tmp_path, tie_word_embeddings=True)
    embed = load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]
    _edit_tensors(folder, lambda t: t.update({"lm_head.weight": embed.copy()}))
    cfg, params, _ = load_hf_folder(folder, progress=False)  # an identical copy: tied, as both transformers do
    assert cfg.tie_embeddings and "embed" not in params
    _edit_tensors(folder, lambda t: t.update({"lm_head.weight": embed[::-1].copy()}))
    with pytest.raises(ModelFormatError, match="set tie_word_embeddings to false"):
        load_hf_folder(folder, progress=False)


@pytest.mark.parametrize("kind, words", [("yarn", "'yarn' RoPE scaling"), ("longrope", "'longrope' RoPE scaling"),
                                         ("dynamic", "'dynamic' RoPE scaling")])
def test_unimplemented_rope_scaling_is_refused(llama_folder, kind, words):
    _edit_config(llama_folder, rope_parameters={"rope_type": kind, "factor": 4.0, "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 16})
    with pytest.raises(UnsupportedModelError, match=words):
        load_hf_folder(llama_folder, progress=False)


def test_llama3_rope_scaling_is_implemented_not_refused(llama_folder):
    """llama3 scaling is computed (tests/test_models.py checks it against transformers), so it loads."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    _edit_config(llama_folder, rope_parameters=scaling)
    cfg, _, _ = load_hf_folder(llama_folder, progress=False)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3"
    raw = json.loads((llama_folder / "config.json").read_text())
    del raw["rope_parameters"]  # transformers 4.x's flat form
    assert ModelConfig.from_hf({**raw, "rope_scaling": scaling}).rope_scaling.kind == "llama3"


LLAMA = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
GEMMA3 = {**LLAMA, "model_type": "gemma3_text", "head_dim": 16, "num_hidden_layers": 6, "sliding_window": 8}
QWEN3_MOE = {**LLAMA, "model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
             "moe_intermediate_size": 16}


@pytest.mark.parametrize("base, key, value, words", [
    (LLAMA, "attention_bias", True, "attention projection biases"),
    (LLAMA, "mlp_bias", True, "MLP projection biases"),
    (LLAMA, "hidden_act", "gelu", "the activation 'gelu'"),
    (LLAMA, "partial_rotary_factor", 0.5, "partial rotary embeddings"),
    (LLAMA, "no_rope_layers", [1, 0], "layers without RoPE"),
    (LLAMA, "logits_scaling", 8.0, "Granite's logit scaling"),
    (LLAMA, "embedding_multiplier", 12.0, "Granite's embedding multiplier"),
    (LLAMA, "residual_multiplier", 0.22, "Granite's residual multiplier"),
    (LLAMA, "attention_multiplier", 0.0078125, "Granite's attention multiplier"),
    (LLAMA, "use_qk_norm", True, "Q/K normalization"),
    (LLAMA, "final_logit_softcapping", 30.0, "final logit soft-capping"),
    (LLAMA, "rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25},
     "partial rotary embeddings"),
    ({**LLAMA, "model_type": "qwen2"}, "use_sliding_window", True, "sliding-window attention"),
    (GEMMA3, "use_bidirectional_attention", True, "bidirectional attention"),
    (QWEN3_MOE, "mlp_only_layers", [0], "dense MLP layers between the expert layers"),
    (QWEN3_MOE, "decoder_sparse_step", 2, "dense MLP layers between the expert layers"),
    ({**QWEN3_MOE, "model_type": "olmoe"}, "clip_qkv", 8.0, "clipped Q/K/V projections"),
    (GEMMA3, "hidden_activation", "gelu", "the activation 'gelu'"),
    (GEMMA3, "layer_types", ["chunked_attention"] * 6, "attention layer types"),
    (GEMMA3, "rope_parameters", {"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                 "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
     "RoPE scaling on Gemma's sliding-window layers"),
])
def test_hf_config_key_needing_a_feature_is_refused(base, key, value, words):
    with pytest.raises(UnsupportedModelError, match=r"corejax does not implement") as e:
        ModelConfig.from_hf({**base, key: value})
    assert words in str(e.value) and "transformers or llama.cpp" in str(e.value)


@pytest.mark.parametrize("base, key, value", [
    (LLAMA, "attention_bias", False), (LLAMA, "mlp_bias", False), (LLAMA, "hidden_act", "silu"),
    (LLAMA, "partial_rotary_factor", 1.0), (LLAMA, "no_rope_layers", [1, 1]), (LLAMA, "sliding_window", 4),
    ({**LLAMA, "model_type": "mistral"}, "sliding_window", None),
    (GEMMA3, "hidden_activation", "gelu_pytorch_tanh"), (GEMMA3, "final_logit_softcapping", 30.0),
])
def test_hf_config_key_at_an_implemented_value_is_accepted(base, key, value):
    """transformers' Llama ignores sliding_window (only Mistral's honours it), so a llama-type one passes."""
    assert ModelConfig.from_hf({**base, key: value}).arch == support.HF_FAMILIES[base["model_type"]].arch


class Recording(Mapping):
    """A config whose lookups are recorded (items() is not a lookup: support.gguf_view copies that way)."""

    def __init__(self, data: Mapping[str, Any]):
        self.data, self.read = dict(data), set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def items(self):
        return self.data.items()


@pytest.mark.parametrize("model_type, config_class", [
    ("llama", "LlamaConfig"), ("mistral", "MistralConfig"), ("qwen2", "Qwen2Config"),
    ("gemma3_text", "Gemma3TextConfig"),
])
def test_from_hf_reads_only_the_keys_its_family_honours(model_type, config_class):
    """support.HF_FAMILIES is the record of what is honoured: from_hf may read no key it does not list."""
    config = Recording(getattr(transformers, config_class)(**SIZES).to_dict())
    try:
        ModelConfig.from_hf(config)
    except UnsupportedModelError:
        assert model_type == "qwen2"  # refused for its biases after every key was read
    family = support.HF_FAMILIES[model_type]
    assert config.read - family.honoured - {u.key for u in family.unimplemented} == set()


def test_bidirectional_from_hf_reads_only_the_keys_its_family_honours():
    """EmbeddingGemma's config: use_bidirectional_attention is honoured on the encoder path (HF_BIDIRECTIONAL) and
    still refused by the decoder's (test_hf_config_key_needing_a_feature_is_refused)."""
    config = Recording(transformers.Gemma3TextConfig(**SIZES, use_bidirectional_attention=True).to_dict())
    cfg = EncoderConfig.from_hf(config, with_head=False)
    assert cfg.decoder is not None and cfg.decoder.arch == "gemma3" and "use_bidirectional_attention" in config.read
    family = support.HF_BIDIRECTIONAL["gemma3_text"]
    assert config.read - family.honoured - {u.key for u in family.unimplemented} == set()
    with pytest.raises(UnsupportedModelError, match="EmbeddingGemma runs as an embedding model"):
        ModelConfig.from_hf(config)


def test_encoder_from_hf_reads_only_the_keys_its_family_honours():
    config = Recording(transformers.BertConfig(vocab_size=96, hidden_size=32, num_attention_heads=4,
                                               num_hidden_layers=2, intermediate_size=64).to_dict())
    EncoderConfig.from_hf(config, with_head=True)
    family = support.ENCODER_FAMILIES["bert"]
    assert config.read - family.honoured - {u.key for u in family.unimplemented} == set()


def test_from_gguf_reads_only_the_keys_its_family_honours(tmp_path):
    from corejax.loading.gguf import read_gguf

    with read_gguf(write_tiny_llama(tmp_path / "m.gguf")) as f:
        meta = Recording({**f.metadata, "llama.attention.key_length": 8, "llama.rope.dimension_count": 8})
        ModelConfig.from_gguf(meta, tie_embeddings=True)
    family = support.GGUF_FAMILIES["llama"]
    read = {k.removeprefix("llama.") for k in meta.read} - {"general.architecture", "tokenizer.ggml.tokens"}
    assert read - family.honoured - {u.key for u in family.unimplemented} == set()


def _gguf_meta(**keys: Any) -> dict[str, Any]:
    base = {"general.architecture": "llama", "llama.context_length": 64, "llama.embedding_length": 32,
            "llama.block_count": 2, "llama.feed_forward_length": 64, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 96}
    return {**base, **{f"llama.{k.replace('__', '.')}": v for k, v in keys.items()}}


@pytest.mark.parametrize("keys, words", [
    ({"rope__scaling__type": "yarn", "rope__scaling__factor": 4.0}, "'yarn' RoPE scaling"),
    ({"rope__scaling__type": "longrope"}, "'longrope' RoPE scaling"),
    ({"rope__dimension_count": 4}, "partial rotary embeddings (RoPE on 4 dimensions"),
    ({"attention__value_length": 16}, "value heads of another size"),
    ({"expert_count": 8, "expert_used_count": 2, "expert_shared_count": 1}, "shared experts"),
    ({"expert_count": 8, "expert_used_count": 2, "expert_gating_func": 2}, "expert gating other than softmax"),
    ({"expert_count": 8, "expert_used_count": 2, "expert_weights_norm": False}, "unnormalised expert weights"),
    ({"attention__sliding_window": 16}, "sliding-window attention"),
    ({"final_logit_softcapping": 30.0}, "final logit soft-capping"),
    ({"logit_scale": 0.125}, "a logit scale"),
    ({"attention__causal": False}, "non-causal attention"),
])
def test_gguf_metadata_needing_a_feature_is_refused(keys, words):
    with pytest.raises(UnsupportedModelError, match=r"the GGUF metadata: .*corejax does not implement") as e:
        ModelConfig.from_gguf(_gguf_meta(**keys), tie_embeddings=True)
    assert words in str(e.value)


def test_gguf_metadata_at_implemented_values_is_accepted():
    cfg = ModelConfig.from_gguf(_gguf_meta(rope__scaling__type="linear", rope__scaling__factor=2.0,
                                           rope__dimension_count=8, attention__value_length=8, expert_count=0,
                                           attention__causal=True, attention__sliding_window=64),
                                tie_embeddings=True)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 2.0 and cfg.head_dim == 8


def test_gguf_with_an_attention_bias_tensor_is_refused(tmp_path):
    path = write_tiny_llama(tmp_path / "bias.gguf", extra_tensors={"blk.0.attn_q.bias": (32,)})
    with pytest.raises(UnsupportedModelError, match=r"1 tensor that corejax's model does not read: "
                                                    r"'blk.0.attn_q.bias' \(biases\)"):
        load_model(ModelSource("bias", "gguf", path), progress=False)


def test_gguf_with_long_rope_factors_but_no_short_ones_is_refused(tmp_path):
    """LongRoPE is computed from its short factors within the original context; long factors alone would run
    as if the file had no RoPE scaling."""
    path = write_tiny_llama(tmp_path / "long.gguf", quantize=None,
                            extra_tensors={"rope_factors_long.weight": ((4,), 2.0)})
    with pytest.raises(UnsupportedModelError, match="LongRoPE long factors"):
        load_model(ModelSource("long", "gguf", path), progress=False)


def test_gguf_rope_freqs_divide_the_frequencies(tmp_path):
    """llama.cpp stores Llama 3.1's RoPE scaling as this tensor (tests/test_families.py checks a converted Llama
    3 against transformers); factors of 1 change nothing, other factors change the logits."""
    ids = np.arange(3, 20, dtype=np.int32)[None]
    plain = load_model(ModelSource("p", "gguf", write_tiny_llama(tmp_path / "p.gguf", quantize=None)),
                       weights="f32", progress=False)
    logits = {}
    for name, value in (("ones", 1.0), ("fours", 4.0)):
        path = write_tiny_llama(tmp_path / f"{name}.gguf", quantize=None,
                                extra_tensors={"rope_freqs.weight": ((4,), value)})
        m = load_model(ModelSource(name, "gguf", path), weights="f32", progress=False)
        assert m.cfg.rope_factors == (value,) * 4
        logits[name] = np.asarray(full_logits(m.params, ids, cfg=m.cfg))
    np.testing.assert_allclose(logits["ones"], np.asarray(full_logits(plain.params, ids, cfg=plain.cfg)), atol=1e-5)
    assert np.abs(logits["fours"] - logits["ones"]).max() > 1e-3


def test_gguf_with_unimplemented_rope_scaling_type_is_refused(tmp_path):
    path = write_tiny_llama(tmp_path / "yarn.gguf", extra_metadata={"llama.rope.scaling.type": "yarn",
                                                                     "llama.rope.scaling.factor": 4.0})
    with pytest.raises(UnsupportedModelError, match=r"'yarn' RoPE scaling \(linear is implemented\) "
                                                    r"\(rope.scaling.type = 'yarn'\)"):
        load_model(ModelSource("yarn", "gguf", path), progress=False)


def test_plain_tiny_gguf_still_loads(tmp_path):
    model = load_model(ModelSource("tiny", "gguf", write_tiny_llama(tmp_path / "t.gguf")), progress=False)
    assert model.cfg.arch == "llama"


def test_gemma3_27b_gguf_query_scale_is_llama_cpps():
    """llama.cpp scales Gemma 3 27B's queries by 1/sqrt(hidden / heads) = 1/sqrt(168), not 1/sqrt(head_dim)."""
    meta = {"general.architecture": "gemma3", "gemma3.context_length": 64, "gemma3.embedding_length": 5376,
            "gemma3.block_count": 62, "gemma3.feed_forward_length": 64, "gemma3.attention.head_count": 32,
            "gemma3.attention.head_count_kv": 16, "gemma3.attention.key_length": 128,
            "gemma3.attention.value_length": 128, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
            "gemma3.attention.sliding_window": 1024, "gemma3.vocab_size": 96}
    assert ModelConfig.from_gguf(meta, tie_embeddings=True).attention_scale == pytest.approx(168**-0.5)
    meta["gemma3.block_count"] = 48  # any other size: 1/sqrt(head_dim)
    assert ModelConfig.from_gguf(meta, tie_embeddings=True).attention_scale == pytest.approx(128**-0.5)


def test_encoder_extra_tensor_is_refused_and_its_unused_pooler_allowed(tmp_path):
    from tiny_bert import write_tiny_bert

    from corejax.loading.encoder import load_encoder_folder, read_hf_config

    folder = write_tiny_bert(tmp_path / "bert")
    raw = read_hf_config(folder)
    assert "pooler.dense.weight" in load_file(str(folder / "model.safetensors"))
    cfg, params = load_encoder_folder(folder, raw)  # BertModel's pooler, which mean pooling never applies
    assert "head" not in params
    _edit_tensors(folder, lambda t: t.update({"encoder.layer.0.attention.self.distance_embedding.weight":
                                              np.ones((127, 8), np.float32)}))
    with pytest.raises(UnsupportedModelError, match="'encoder.layer.0.attention.self.distance_embedding.weight'"):
        load_encoder_folder(folder, raw)


@pytest.mark.parametrize("key, value, words", [
    ("position_embedding_type", "relative_key", "'relative_key' position embeddings"),
    ("is_decoder", True, "causal (decoder) attention"),
])
def test_encoder_config_needing_a_feature_is_refused(key, value, words):
    config = {"model_type": "bert", "vocab_size": 96, "hidden_size": 32, "num_attention_heads": 4,
              "num_hidden_layers": 2, "intermediate_size": 64, key: value}
    with pytest.raises(UnsupportedModelError, match="corejax does not implement") as e:
        EncoderConfig.from_hf(config, with_head=False)
    assert words in str(e.value)
