"""EmbeddingGemma: Gemma 3's decoder block run bidirectionally as a sentence encoder (engine/cache.py
BidirectionalAttention), then sentence-transformers' mean Pooling, Dense modules and Normalize. A tiny random
checkpoint against sentence-transformers (windows both ways, padding, a Dense with bias and tanh), the refusals,
and the real embeddinggemma-300m against sentence-transformers, in-process and through the sandboxed Session
(slow: real model)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from references import require
from tiny_bert import write_tiny_bert

import corejax

torch = require("torch")
transformers = require("transformers")
from safetensors.numpy import save_file  # noqa: E402

WINDOW = 8  # config.json's sliding_window: a sliding layer sees keys within 4 positions either side
TINY_TEXTS = ["the movie was great", "", "not good and very boring film " * 4, "café naïve 東京 xyz",
              "i love this actor so really much and the plot is wonderful"]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def write_tiny_embeddinggemma(folder, *, activation: str = "torch.nn.modules.activation.Tanh"):
    """A random Gemma3TextModel (use_bidirectional_attention) with tiny BERT's WordPiece tokenizer, and the
    sentence-transformers modules EmbeddingGemma has: mean Pooling, Dense (here one, with bias), Normalize."""
    write_tiny_bert(folder)
    vocab = len((folder / "vocab.txt").read_text().split())
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], use_bidirectional_attention=True,
        query_pre_attn_scalar=16, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Gemma3TextModel(cfg).eval()
    with torch.no_grad():  # norms start at 0 (Gemma's 1 + w): randomise so a dropped one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(str(folder), safe_serialization=True)
    modules = [("0", "", "Transformer"), ("1", "1_Pooling", "Pooling"), ("2", "2_Dense", "Dense"),
               ("3", "3_Normalize", "Normalize")]
    (folder / "modules.json").write_text(json.dumps([
        {"idx": i, "name": name, "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (name, path, kind) in enumerate(modules)]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True}))
    (folder / "2_Dense").mkdir()
    (folder / "2_Dense" / "config.json").write_text(json.dumps({
        "in_features": 32, "out_features": 24, "bias": True, "activation_function": activation}))
    rng = np.random.default_rng(0)
    save_file({"linear.weight": rng.normal(0, 0.3, (24, 32)).astype(np.float32),
               "linear.bias": rng.normal(0, 0.3, (24,)).astype(np.float32)},
              str(folder / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_embeddinggemma(tmp_path_factory.mktemp("tiny-embeddinggemma"))


def test_tiny_embeddinggemma_matches_sentence_transformers(tiny):
    st = require("sentence_transformers")
    ref = st.SentenceTransformer(str(tiny), device="cpu").encode(TINY_TEXTS, convert_to_numpy=True)
    with corejax.Session(str(tiny), sandbox=False, progress=False) as s:
        assert s.info()["weights"] == "f32"
        ours = s.embed(TINY_TEXTS)  # one batch, padded to the longest: padding keys must stay invisible
        alone = np.stack([s.embed(t) for t in TINY_TEXTS])
        lengths = [len(s.tokenize(t)) for t in TINY_TEXTS]
    assert max(lengths) > 2 * WINDOW  # the sliding layers' window matters
    assert ours.shape == (len(TINY_TEXTS), 24) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    np.testing.assert_allclose(alone, ref, atol=2e-5)


def test_bidirectional_window_is_transformers(tiny):
    """Hidden states of one long sequence against Gemma3TextModel: each side of the window exactly W // 2."""
    from corejax.engine.cache import BidirectionalAttention
    from corejax.hub import ModelSource
    from corejax.loading.loader import load_model
    from corejax import models

    m = load_model(ModelSource("tiny", "hf", tiny), progress=False)
    assert m.cfg.decoder is not None and m.cfg.decoder.layer_windows == (WINDOW, 0, WINDOW)
    ids = np.random.default_rng(3).integers(5, m.cfg.vocab_size, size=(2, 24)).astype(np.int32)
    lengths = np.array([24, 17], np.int32)
    positions = np.broadcast_to(np.arange(24, dtype=np.int32), ids.shape)
    keys = np.where(positions < lengths[:, None], positions, -1)
    ours, _ = models.forward(m.params, ids, positions, BidirectionalAttention(keys), m.cfg.decoder)
    model = transformers.Gemma3TextModel.from_pretrained(str(tiny)).eval()
    mask = torch.tensor(positions < lengths[:, None]).long()
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids).long(), attention_mask=mask).last_hidden_state.numpy()
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(ours)[row, :n], want[row, :n], atol=1e-4, rtol=1e-4)


def test_embeddinggemma_is_never_run_causally(tiny):
    from corejax.loading.convert import load_hf_folder

    with pytest.raises(corejax.UnsupportedModelError, match="bidirectional attention in a generative model"):
        load_hf_folder(tiny, progress=False)  # the decoder loader (generate, quantize) refuses it
    with corejax.Session(str(tiny), sandbox=False, progress=False) as s:
        with pytest.raises(corejax.UnsupportedModelError, match="encoder"):
            s.generate("the movie")


def test_dense_activation_not_implemented_is_refused(tmp_path):
    folder = write_tiny_embeddinggemma(tmp_path, activation="torch.nn.modules.activation.Softplus")
    from corejax.hub import ModelSource
    from corejax.loading.loader import load_model

    with pytest.raises(corejax.UnsupportedModelError, match=r"'2_Dense' applies the activation .*Softplus"):
        load_model(ModelSource("tiny", "hf", folder), progress=False)


def test_dense_tensors_are_checked(tiny, tmp_path):
    from corejax.hub import ModelSource
    from corejax.loading.loader import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny, folder)
    save_file({"linear.weight": np.zeros((24, 32), np.float32), "linear.bias": np.zeros(24, np.float32),
               "linear.scale": np.ones(24, np.float32)}, str(folder / "2_Dense" / "model.safetensors"))
    with pytest.raises(corejax.UnsupportedModelError, match="'linear.scale'"):
        load_model(ModelSource("tiny", "hf", folder), progress=False)
    cfg = json.loads((folder / "2_Dense" / "config.json").read_text())
    (folder / "2_Dense" / "config.json").write_text(json.dumps({**cfg, "in_features": 31}))
    with pytest.raises(corejax.ModelFormatError, match="takes 31 features but is fed 32"):
        load_model(ModelSource("tiny", "hf", folder), progress=False)


def test_token_without_an_embedding_row_is_refused(tiny):
    from corejax.hub import ModelSource
    from corejax.loading.loader import load_model
    from corejax.serving.encode import Encoder

    m = load_model(ModelSource("tiny", "hf", tiny), progress=False)
    enc = Encoder(m.cfg, m.params, m.tokenizer, m.sentence)
    ids = enc.token_ids(["café"])[0]
    top = max(ids)
    enc.cfg = dataclasses.replace(m.cfg, vocab_size=top)  # one token past the rows: EmbeddingGemma's <image_soft_token>
    with pytest.raises(corejax.InvalidParameterError, match=rf"\(id {top}\), which this model has no embedding for"):
        enc.token_ids(["café"])
    enc.cfg = dataclasses.replace(m.cfg, vocab_size=top + 1)
    assert enc.token_ids(["café"]) == [ids]


# ---- the real model ----------------------------------------------------------------------------------------

PROMPT = "query"  # one of config_sentence_transformers.json's prompts: a prefix of the text
VARIED = [
    "Hello world",
    "",
    "Ünïcödé façade — naïve café, 東京 北京大学, Привет, как дела? 😀",
    "emoji 🤖🎉 in 🇫🇷 text",
    "tab\tnew\nline   spaces",
    "The quick brown fox jumps over the lazy dog. " * 40,  # ~400 tokens: past the sliding layers' 256 each side
    "Sentence embeddings map a text to one vector so that texts with similar meanings lie close together; "
    "retrieval, clustering and classification then work on those vectors. " * 3,
    "Short, but with punctuation!!! ??? ... --- ###",
]


@pytest.fixture(scope="module")
def reference(embeddinggemma):
    """sentence-transformers' float32 embeddings: the default encode (no prompt), and with the query prompt."""
    st = require("sentence_transformers")
    model = st.SentenceTransformer(str(embeddinggemma), device="cpu")
    prompt = model.prompts[PROMPT]
    return (model.encode(VARIED, convert_to_numpy=True),
            prompt, model.encode(VARIED[:3], prompt_name=PROMPT, convert_to_numpy=True))


@pytest.mark.slow
def test_embeddinggemma_matches_sentence_transformers(embeddinggemma, reference):
    ref, prompt, ref_prompted = reference
    with corejax.Session("embeddinggemma-300m", sandbox=False, progress=False) as s:
        ours = s.embed(VARIED)  # batched, lengths 2 to ~400 tokens
        alone = s.embed(VARIED[5])
        prompted = s.embed([prompt + t for t in VARIED[:3]])  # corejax's embed has no prompt argument
        assert s.info()["weights"] == "f32"
    assert ours.shape == (len(VARIED), 768) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    assert _cos(ours, ref).min() >= 0.9999, _cos(ours, ref)
    assert _cos(alone, ref[5]) >= 0.9999
    assert _cos(prompted, ref_prompted).min() >= 0.9999, _cos(prompted, ref_prompted)


@pytest.mark.slow
def test_embeddinggemma_sandboxed_session(embeddinggemma, reference):
    ref, _, _ = reference
    with corejax.Session("embeddinggemma-300m", progress=False) as s:
        ours = s.embed(VARIED[:3])
        with pytest.raises(corejax.UnsupportedModelError, match="encoder"):
            s.generate("Hello")
    assert _cos(ours, ref[:3]).min() >= 0.9999, _cos(ours, ref[:3])
