"""MPNet as an encoder (models/bert.py with MPNet's differences as EncoderConfig data): a tiny random MPNetModel
vs transformers, the relative-position buckets, the config keys read and refused, and all-mpnet-base-v2 vs
sentence-transformers and HF's tokenizer through the sandboxed Session (slow: real model)."""

from __future__ import annotations

import numpy as np
import pytest

import corejax
from references import require
from test_embed import VARIED as EMBED_TEXTS
from corejax.errors import UnsupportedModelError
from corejax.kernels.policy import Kernels
from corejax.types import support
from corejax.types.config import EncoderConfig

TINY = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=66)

# test_embed's texts, with MPNet's lowercasing, its special tokens typed into the text and a ~90-token one
# (128 rows, past the exact buckets) before the two last; the last but one is cut to max_seq_length (384).
VARIED = [*EMBED_TEXTS[:8], "UPPER Case ÀÉÎ Ærøskøbing", "<pad> and <s> </s> <mask> written in the text",
          "The quick brown fox jumps over the lazy dog. " * 8, *EMBED_TEXTS[8:]]


def test_relative_buckets_match_transformers():
    torch = require("torch")
    require("transformers")
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    from corejax.models.bert import relative_buckets

    cfg = EncoderConfig.from_hf({"model_type": "mpnet", **TINY}, with_head=False)
    for t in (1, 7, 300, 512):
        pos = torch.arange(t)
        want = MPNetEncoder.relative_position_bucket(pos[None, :] - pos[:, None]).numpy()
        np.testing.assert_array_equal(relative_buckets(t, cfg), want)


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory):
    torch = require("torch")
    require("transformers")
    from transformers import MPNetConfig, MPNetModel

    folder = tmp_path_factory.mktemp("tiny-mpnet")
    torch.manual_seed(0)
    model = MPNetModel(MPNetConfig(**TINY)).eval()
    with torch.no_grad():  # non-trivial norms, biases and relative bias, so a swapped or missed tensor shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.encoder.relative_attention_bias.weight.mul_(20)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder, model


@pytest.mark.parametrize("path", ["native", "xla"])
def test_tiny_mpnet_matches_transformers(tiny_mpnet, path):
    """Right padding, lengths past the exact buckets, and a pad id (1) inside a sequence (its position row
    stays at padding_idx, as fairseq's make_positions), on the native projections and on XLA's ops."""
    import jax
    import torch

    from corejax.loading.encoder import load_encoder_folder, read_hf_config
    from corejax.loading.loader import ENCODER_MATRICES, block_params
    from corejax.models import bert

    folder, model = tiny_mpnet
    kernels = Kernels.detect() if path == "native" else Kernels.xla()
    if path == "native" and not kernels.native:
        pytest.skip("the native kernels could not be built here")
    cfg, params = load_encoder_folder(folder, read_hf_config(folder))
    assert (cfg.arch, cfg.max_context, cfg.type_vocab_size, cfg.relative_buckets) == ("mpnet", 64, 0, 32)
    assert "embed_types" not in params and params["relative_bias"].shape == (32, 4)
    if kernels.native:
        params = block_params(params, kernels, ENCODER_MATRICES)
    rng = np.random.default_rng(0)
    lengths = np.array([64, 40, 3, 1], np.int32)
    tokens = np.zeros((4, 64), np.int32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(3, TINY["vocab_size"], n)
    tokens[1, 5] = 1  # <pad> typed into the text

    def encode(params, tokens, lengths):  # the kernel policy decides while tracing
        with kernels.active():
            return bert.encode(params, tokens, lengths, cfg)

    ours = np.asarray(jax.jit(encode)(params, tokens, lengths))
    for row, n in enumerate(lengths):
        with torch.no_grad():
            want = model(input_ids=torch.tensor(tokens[row:row + 1, :n], dtype=torch.long)).last_hidden_state[0]
        np.testing.assert_allclose(ours[row, :n], want.numpy(), atol=2e-5, err_msg=f"row {row}")


def test_mpnet_from_hf_reads_only_the_keys_its_family_honours():
    transformers = require("transformers")
    from test_refusals import Recording

    config = Recording(transformers.MPNetConfig(**TINY).to_dict())
    EncoderConfig.from_hf(config, with_head=False)
    family = support.ENCODER_FAMILIES["mpnet"]
    assert config.read - family.honoured - {u.key for u in family.unimplemented} == set()


def test_mpnet_config_needing_a_feature_is_refused():
    with pytest.raises(UnsupportedModelError, match="corejax does not implement") as e:
        EncoderConfig.from_hf({"model_type": "mpnet", **TINY, "relative_attention_num_buckets": 64}, with_head=False)
    assert "64 relative-attention buckets" in str(e.value)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.slow
def test_mpnet_matches_sentence_transformers(mpnet):
    """The sandboxed Session at its default weights (bf16 or f16 where the native kernels run) vs
    sentence-transformers' float32, batched (lengths 2..384 in one call) and a text alone."""
    st = require("sentence_transformers")
    with corejax.Session("all-mpnet-base-v2", progress=False) as session:
        ours = session.embed(VARIED)
        alone = session.embed(VARIED[4])
    assert ours.shape == (len(VARIED), 768) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)  # 2_Normalize
    ref = st.SentenceTransformer(str(mpnet), device="cpu").encode(VARIED, convert_to_numpy=True)
    cos = _cosines(ours, ref)
    assert cos.min() >= 0.9999, cos
    np.testing.assert_allclose(alone, ours[4], atol=2e-3)  # alone (another bucket): the same vector


@pytest.mark.slow
def test_mpnet_token_ids_match_hf_tokenizer(mpnet):
    from test_embed import token_ids_match_hf_tokenizer

    ours = token_ids_match_hf_tokenizer("all-mpnet-base-v2", mpnet, VARIED, "mean", 384)
    assert ours[0][0] == 0 and ours[0][-1] == 2  # <s> ... </s>
