"""Model math vs HF transformers on small random checkpoints, and cached decode vs one full forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import require

torch = require("torch")
transformers = require("transformers")

from corejax.kernels.policy import Kernels  # noqa: E402
from corejax import models  # noqa: E402
from corejax.engine.cache import DenseKVCache  # noqa: E402
from corejax.engine.programs import full_logits  # noqa: E402
from corejax.loading.convert import load_hf_folder  # noqa: E402

VOCAB = 160


def _save(model, tmp_path):
    with torch.no_grad():
        for p in model.parameters():  # norms init to 0/1 in HF: randomise so a wrong norm convention shows
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


def tiny_llama(tmp_path, **overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    return model, _save(model, tmp_path)


def tiny_gemma3(tmp_path, **overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
              num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
              sliding_window=6, query_pre_attn_scalar=32, rms_norm_eps=1e-6)
    kw.update(overrides)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**kw)).eval()
    return model, _save(model, tmp_path)


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gemma3])
def test_full_forward_matches_transformers(builder, tmp_path):
    model, folder = builder(tmp_path)
    cfg, params, _ = load_hf_folder(folder, progress=False)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(2, 20)).astype(np.int32)
    ours = np.asarray(full_logits(params, ids, cfg=cfg))
    ref = _hf_logits(model, ids)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_llama_rope_scaling_and_tied_embeddings(tmp_path):
    model, folder = tiny_llama(tmp_path, tie_word_embeddings=True,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    cfg, params, _ = load_hf_folder(folder, progress=False)
    assert cfg.tie_embeddings and cfg.rope_scaling is not None and "embed" not in params
    ids = np.random.default_rng(2).integers(0, VOCAB, size=(1, 40)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(full_logits(params, ids, cfg=cfg)), _hf_logits(model, ids), atol=2e-4)


def test_gemma3_rope_scaling_applies_to_global_layers_only(tmp_path):
    """Gemma 3 4B+ scale RoPE on their global layers; the sliding-window layers keep plain frequencies (the
    local layers once got the scaling too: logits 1.27 off)."""
    model, folder = tiny_gemma3(tmp_path, rope_scaling={"rope_type": "linear", "factor": 8.0})
    cfg, params, _ = load_hf_folder(folder, progress=False)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == "linear"
    ids = np.random.default_rng(5).integers(0, VOCAB, size=(1, 40)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(full_logits(params, ids, cfg=cfg)), _hf_logits(model, ids), atol=2e-4)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gemma3])
def test_cached_prefill_then_decode_equals_full_forward(builder, tmp_path):
    """Prefill 9 tokens (padded to 16), then decode 11 one at a time: past Gemma's 6-token window."""
    _, folder = builder(tmp_path)
    cfg, params, _ = load_hf_folder(folder, progress=False)
    ids = np.random.default_rng(3).integers(0, VOCAB, size=(1, 20)).astype(np.int32)
    full = np.asarray(full_logits(params, ids, cfg=cfg))[0]

    run = jax.jit(lambda p, t, pos, c: _logits(p, t, pos, c, cfg))
    cache = DenseKVCache.create(cfg, 1, 32)
    prompt = np.zeros((1, 16), np.int32)
    prompt[0, :9] = ids[0, :9]
    logits, cache = run(params, prompt, np.arange(16, dtype=np.int32)[None], cache)
    got = [np.asarray(logits[0, :9])]
    for pos in range(9, 20):
        logits, cache = run(params, ids[:, pos:pos + 1], np.array([[pos]], np.int32), cache)
        got.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.concatenate(got), full, atol=1e-4, rtol=0)


def _logits(params, tokens, positions, cache, cfg):
    with Kernels.detect().active():  # what a jit site passes: this process's kernels
        hidden, cache = models.forward(params, tokens, positions, cache, cfg)
        return models.lm_head(params, hidden, cfg), cache


def test_batched_rows_are_independent(tmp_path):
    _, folder = tiny_llama(tmp_path)
    cfg, params, _ = load_hf_folder(folder, progress=False)
    ids = np.random.default_rng(4).integers(0, VOCAB, size=(3, 12)).astype(np.int32)
    together = np.asarray(full_logits(params, ids, cfg=cfg))
    for row in range(3):
        alone = np.asarray(full_logits(params, ids[row:row + 1], cfg=cfg))[0]
        np.testing.assert_allclose(together[row], alone, atol=1e-5)
    assert jnp.isfinite(together).all()
