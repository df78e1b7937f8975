"""The encoder tasks' embeddings: non-causal flash attention, BERT vs transformers (tiny, random), and
all-MiniLM-L6-v2 vs sentence-transformers and HF's tokenizer (slow: real model)."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_bert import write_tiny_bert
from tiny_model import write_tiny_llama

import corejax
from references import require
from corejax.kernels import ffi
from corejax.kernels.policy import Kernels
from corejax.kernels.small_matmul import BlockedWeight

VARIED = [
    "Hello world",
    "",
    "a",
    " ",
    "Ünïcödé façade — naïve café, 東京 北京大学, Привет, как дела?",
    "😀",
    "emoji 🤖🎉 in 🇫🇷 text",
    "tab\tnew\nline   spaces",
    "The quick brown fox jumps over the lazy dog. " * 40,  # > 256 tokens: truncated
    "Short, but with punctuation!!! ??? ... --- ###",
]


@pytest.mark.parametrize("impl", ["lax", "reference", "pallas"])
@pytest.mark.parametrize("t,block", [(16, 8), (37, 16)])
def test_flash_attention_non_causal_matches_dense_softmax(impl, t, block):
    import jax.numpy as jnp
    from corejax.kernels.flash_attention import flash_attention
    from corejax.kernels.flash_attention import BlockSizes

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, t, 4, 8)).astype(np.float32) for _ in range(3))
    lengths = np.array([t, t // 2 + 1])
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t))
    kpos = np.where(pos < lengths[:, None], pos, -1).astype(np.int32)
    out = flash_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), pos, kpos, causal=False, impl=impl,
                          block_sizes=BlockSizes(block, block), interpret=impl == "pallas")
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8)
    s = np.where((kpos >= 0)[:, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5)


def test_flash_attention_rejects_window_without_causal():
    import jax.numpy as jnp
    from corejax.kernels.flash_attention import flash_attention

    x = jnp.zeros((1, 4, 1, 8))
    pos = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="causal"):
        flash_attention(x, x, x, pos, pos, causal=False, window=2)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    folder = write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    with corejax.Session(str(folder), sandbox=False, progress=False) as s:
        yield folder, s


def test_tiny_bert_matches_transformers(tiny_encoder):
    """No modules.json: CLS pooling, no normalization, as a plain transformers checkpoint."""
    torch = require("torch")
    require("transformers")
    from transformers import AutoTokenizer, BertModel

    folder, session = tiny_encoder
    texts = ["the movie was great", "", "not good and very boring film " * 3, "café naïve 東京 xyz"]
    ours = session.embed(texts)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        for text, row in zip(texts, ours):
            ids = tok(text, return_tensors="pt")
            assert session.tokenize(text) == ids["input_ids"][0].tolist()
            want = model(**ids).last_hidden_state[0, 0].numpy()
            # the default weights round the matrices (and, for bf16, each matmul's inputs) to 16 bits
            np.testing.assert_allclose(row, want, atol={"f16": 1e-4, "bf16": 1e-3}.get(session.info()["weights"], 1e-5))


def test_embed_argument_errors(tiny_encoder):
    _, session = tiny_encoder
    for bad in (None, 3, [1, 2], b"bytes", ["ok", None]):
        with pytest.raises(corejax.InvalidParameterError):
            session.embed(bad)
    with pytest.raises(corejax.InvalidParameterError, match="truncate"):
        session.embed(["x"], truncate="no")
    with pytest.raises(corejax.InvalidParameterError, match="at most 64"):
        session.embed(["the " * 100], truncate=False)
    assert session.embed(["the " * 100]).shape == (1, 32)
    assert session.embed([]).shape == (0, 32)
    assert session.embed("the").shape == (32,)


def test_length_buckets_limit_compiles(tiny_encoder):
    """Lengths 3..40 and batch sizes 1..40 compile only power-of-two (batch, length) buckets."""
    _, session = tiny_encoder
    encode = session._runtime.encoder.runner.programs.encode
    before = encode._cache_size()
    for n in (1, 2, 3, 5, 7):
        session.embed(["the " * (i % 38 + 1) for i in range(n)])
    # lengths: buckets 16, 32, 64; batches: 1, 2, 4, 8 -> far fewer than the 5 x 38 shapes seen
    assert encode._cache_size() - before <= 8


def test_encoder_weights_16_bit_by_default_f32_on_request(tiny_encoder, monkeypatch):
    """With the native kernel, an encoder's matrices load as bfloat16 (where the kernel has AVX512_BF16) or
    float16: half the bytes streamed per token; weights="f32" keeps them float32 and matches transformers to
    float32 rounding; "f16" and "bf16" on request; all agree closely."""
    torch = require("torch")
    require("transformers")
    from transformers import AutoTokenizer, BertModel

    folder, session = tiny_encoder
    texts = ["the movie was great", "not good and very boring film " * 3]
    with corejax.Session(str(folder), sandbox=False, progress=False, weights="f32") as exact:
        assert exact.info()["weights"] == "f32"
        ours32 = exact.embed(texts)
        f32_bytes = exact.info()["weight_bytes"]
    if ffi.available():
        assert session.info()["weights"] == ("bf16" if ffi.bf16_dot() else "f16")
        assert session.info()["weight_bytes"] < f32_bytes
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        want = np.stack([model(**tok(t, return_tensors="pt")).last_hidden_state[0, 0].numpy() for t in texts])
    np.testing.assert_allclose(ours32, want, atol=1e-5)
    np.testing.assert_allclose(session.embed(texts), want, atol=1e-3)
    for mode, atol in (("f16", 1e-4), ("bf16", 1e-3)):
        with corejax.Session(str(folder), sandbox=False, progress=False, weights=mode) as s:
            assert s.info()["weights"] == mode and s.info()["weight_bytes"] < f32_bytes
            np.testing.assert_allclose(s.embed(texts), want, atol=atol)
    monkeypatch.setattr(ffi, "bf16_dot", lambda: False)  # a CPU without AVX512_BF16: bf16 goes to XLA's dot
    with corejax.Session(str(folder), sandbox=False, progress=False, weights="bf16") as s:
        assert not any(isinstance(w, BlockedWeight) for w in s._runtime.encoder.runner.params["layers"][0].values())
        np.testing.assert_allclose(s.embed(texts), want, atol=1e-3)


def test_f16_weights_are_for_encoders_only(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_llama(path)
    with pytest.raises(corejax.InvalidParameterError, match="encoder"):
        corejax.Session(str(path), sandbox=False, progress=False, weights="f16")


@pytest.fixture(scope="module")
def minilm():
    from corejax import hub

    return hub.resolve("all-minilm-l6-v2", progress=False).path


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", [False, True])
def test_minilm_matches_sentence_transformers(minilm, sandbox):
    st = require("sentence_transformers")
    ours = corejax.embed(VARIED, model="all-minilm-l6-v2", sandbox=sandbox)
    assert ours.shape == (len(VARIED), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)  # 2_Normalize
    ref = st.SentenceTransformer(str(minilm), device="cpu").encode(VARIED, convert_to_numpy=True)
    cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() >= 0.9999, cos


def token_ids_match_hf_tokenizer(name: str, folder, texts: list[str], pooling: str, max_length: int) -> list:
    """The registry encoder's token ids of `texts` are HF's own tokenizer's (truncated at its max_length, which
    truncate=False refuses to do); returns them."""
    from transformers import AutoTokenizer

    from corejax.serving.encode import Encoder
    from corejax.hub import ModelSource
    from corejax.loading.loader import load_model

    m = load_model(ModelSource(name, "hf", folder), progress=False)
    assert (m.sentence.pooling, m.sentence.normalize, m.sentence.max_length) == (pooling, True, max_length)
    enc = Encoder(m.cfg, m.params, m.tokenizer, m.sentence)
    hf = AutoTokenizer.from_pretrained(str(folder))
    ours = enc.token_ids(texts)
    for text, ids in zip(texts, ours):
        assert ids == hf(text, truncation=True, max_length=max_length)["input_ids"], text
    assert max(len(i) for i in ours) == max_length
    with pytest.raises(corejax.InvalidParameterError, match="truncate=True"):
        enc.token_ids(texts, truncate=False)
    return ours


@pytest.mark.slow
def test_minilm_token_ids_match_hf_tokenizer(minilm):
    token_ids_match_hf_tokenizer("all-minilm-l6-v2", minilm, VARIED, "mean", 256)


@pytest.mark.slow
def test_embed_cli(minilm, capsys):
    from corejax.cli import main

    assert main(["embed", "hello", "world", "-q"]) == 0
    rows = [np.array(__import__("json").loads(line)) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0].shape == (384,)
    np.testing.assert_allclose(rows[0], corejax.embed("hello"), atol=1e-6)
    assert main(["embed", "hello", "-q", "--no-sandbox", "--weights", "f32"]) == 0
    exact = np.array(__import__("json").loads(capsys.readouterr().out))
    assert float(exact @ rows[0]) > 0.9999  # bf16 or f16 weights (the default here) vs exact float32


def test_encoder_without_native_kernels_matches_native(tiny_encoder, monkeypatch):
    """The XLA path (dense + layer norm + GELU ops, the tiled flash kernel) and the native path (fused
    epilogues, encoder_attention.cc) give the same hidden states on the same weights, padding included.
    float16 weights: both paths widen them exactly (bf16 would also round the kernel's inputs, by design)."""

    import jax

    from corejax.models import bert

    if not ffi.available():
        pytest.skip("the native kernels could not be built here: there is only the XLA path")
    folder, _ = tiny_encoder
    with corejax.Session(str(folder), sandbox=False, progress=False, weights="f16") as session:
        runner = session._runtime.encoder.runner
        tokens = np.array([[2, 5, 9, 7, 3, 0, 0, 0], [2, 11, 3, 0, 0, 0, 0, 0]], np.int32)
        lengths = np.array([5, 3], np.int32)

        def run(kernels: Kernels) -> np.ndarray:  # the kernel policy decides while tracing
            def encode(params, tokens, lengths):
                with kernels.active():
                    return bert.encode(params, tokens, lengths, runner.cfg)

            return np.asarray(jax.jit(encode)(runner.params, tokens, lengths))

        assert runner.kernels.native
        native = run(runner.kernels)
        xla = run(Kernels.xla())
        real = np.arange(8)[None, :] < lengths[:, None]
        np.testing.assert_allclose(native[real], xla[real], atol=2e-5)
