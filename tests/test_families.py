"""Each decoder family against transformers on random weights of its real layout (tests/families.py): float32 logits
within 1e-3 relative and 32 greedy tokens identical, from the HF folder and from the GGUF llama.cpp's converter
makes of it; the converter's Q8_0 file through the native quantized kernels, against llama.cpp where it is
installed (the bench extra)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from corejax.engine.programs import full_logits
from corejax.hub import ModelSource
from corejax.loading.convert import load_hf_folder
from corejax.loading.loader import load_model
from corejax.serving.runner import ModelRunner
from corejax.serving.scheduler import Scheduler
from corejax.types.config import EngineConfig
from corejax.types.options import SamplingParams
from families import ARCH, FAMILIES, GGUF_OVERRIDES, add_vocabulary, build, convert
from references import require

torch = require("torch")
transformers = require("transformers")

VOCAB = 160
NEW_TOKENS = 32


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _greedy(cfg, params, prompt: list[int], n: int) -> list[int]:
    """corejax's own serving path: the paged engine and the scheduler, greedy. float32 KV: random weights leave
    near-ties between logits that bfloat16 keys (the default) can flip; this checks the family's math."""
    runner = ModelRunner(cfg, params, EngineConfig(kv_cache_tokens=256, kv_dtype="float32"))
    sch = Scheduler(runner, background=False)
    req = sch.submit(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), frozenset())
    sch.run_until_idle()
    return [e.token for e in req]


def _assert_logits_close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-3) -> None:
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rel, f"max |logit difference| is {err:.2e} of the largest logit"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.99


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_folder_matches_transformers(family, tmp_path):
    model = build(family, tmp_path, VOCAB)
    cfg, params, _ = load_hf_folder(tmp_path, progress=False)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, size=(2, 24)).astype(np.int32)  # past the 8-token windows
    _assert_logits_close(np.asarray(full_logits(params, ids, cfg=cfg)), _hf_logits(model, ids))
    prompt = rng.integers(0, VOCAB, size=12).tolist()
    assert _greedy(cfg, params, prompt, NEW_TOKENS) == _hf_greedy(model, prompt, NEW_TOKENS)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2's byte-level BPE tokenizer as an HF tokenizer.json (read from its GGUF by transformers): a
    vocabulary llama.cpp's converter knows (pre-tokenizer smollm)."""
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    tok.save_pretrained(folder)
    return folder


class Converted:
    """One family's random checkpoint as an HF folder (with a tokenizer its converter reads) and as the f32 and
    Q8_0 GGUFs llama.cpp's converter writes, built once per test module."""

    def __init__(self, family: str, root: Path, bpe_tokenizer: Path):
        self.folder = root / "hf"
        self.folder.mkdir()
        self.vocab = add_vocabulary(family, self.folder, bpe_tokenizer)
        self.model = build(family, self.folder, self.vocab, **GGUF_OVERRIDES.get(family, {}))
        self.f32 = convert(self.folder, root / f"{family}.gguf")
        self.q8 = convert(self.folder, root / f"{family}-q8.gguf", "q8_0")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, smollm2_tokenizer):
    made: dict[str, Converted] = {}

    def get(family: str) -> Converted:
        if family not in made:
            made[family] = Converted(family, tmp_path_factory.mktemp(family), smollm2_tokenizer)
        return made[family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converted_gguf_matches_transformers(family, converted):
    """llama.cpp's converter writes the family's GGUF (its metadata keys, tensor names, Q/K permutation); corejax
    reads it as the same model, and its Q8_0 file through the quantized kernels stays close."""
    c = converted(family)
    model, vocab = c.model, c.vocab
    loaded = load_model(ModelSource(family, "gguf", c.f32), weights="f32", progress=False)
    rng = np.random.default_rng(2)
    ids = rng.integers(3, vocab, size=(1, 24)).astype(np.int32)
    ref = _hf_logits(model, ids)
    _assert_logits_close(np.asarray(full_logits(loaded.params, ids, cfg=loaded.cfg)), ref)
    prompt = rng.integers(3, vocab, size=12).tolist()
    expected = _hf_greedy(model, prompt, NEW_TOKENS)
    assert _greedy(loaded.cfg, loaded.params, prompt, NEW_TOKENS) == expected

    q8 = load_model(ModelSource(family, "gguf", c.q8), weights="native", progress=False)
    ours = np.asarray(full_logits(q8.params, ids, cfg=q8.cfg))
    assert np.linalg.norm(ours - ref) <= 0.05 * np.linalg.norm(ref)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantized_greedy_equals_llama_cpp(family, converted):
    """The same Q8_0 file: corejax's greedy tokens are llama.cpp's (llama-cpp-python, the bench extra)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is the bench extra's peer")
    c = converted(family)
    q8 = load_model(ModelSource(family, "gguf", c.q8), weights="native", progress=False)
    prompt = np.random.default_rng(3).integers(3, c.vocab, size=12).tolist()
    llm = llama_cpp.Llama(str(c.q8), n_ctx=256, n_threads=2, verbose=False, logits_all=False)
    theirs = [int(t) for t in itertools.islice(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0),
                                                NEW_TOKENS)]
    ours = _greedy(q8.cfg, q8.params, prompt, NEW_TOKENS)
    # Both quantize the activations to int8 (corejax twice, llama.cpp once), so a random model's near ties (its
    # logits are flat: a 49k vocabulary within a few units) may go either way; the sequences then part. Where
    # they part, the two tokens must be a near tie in corejax's own logits, within llama.cpp's rounding.
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), NEW_TOKENS)
    if agree < NEW_TOKENS:
        logits = np.asarray(full_logits(q8.params, np.asarray([prompt + ours[:agree]], np.int32), cfg=q8.cfg))[0, -1]
        gap = logits[ours[agree]] - logits[theirs[agree]]
        assert 0 <= gap <= 0.01 * np.abs(logits).max(), (
            f"corejax and llama.cpp part at token {agree} of {NEW_TOKENS}, and not at a near tie: corejax's logit "
            f"for its token is {gap:.4f} above llama.cpp's token's")
    print(f"{family}: greedy equal to llama.cpp's for {agree} of {NEW_TOKENS} tokens")


# Families whose Session runs corejax quantize's Q4_0 (a mixture of experts among them: its expert stacks are
# quantized too); the others run the converter's Q8_0.
REQUANTIZED = frozenset({"granite", "mistral", "olmo2", "phi3", "qwen3moe", "smollm3"})


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_through_everything(family, tmp_path, converted):
    """The converter's Q8_0 file or corejax quantize's Q4_0 of its f32 file (alternate families, so both paths
    run and the suite stays short), in a sandboxed Session: batched streams equal each alone, n-gram
    speculation equals plain decoding, a regex constrains the text, a repeated prompt reuses its cached pages.
    Every family's Q8_0 file also runs through the native kernels in test_converted_gguf_matches_transformers."""
    import threading

    import corejax
    from corejax.quantize import quantize_gguf

    c = converted(family)
    if family in REQUANTIZED:
        paths = (quantize_gguf(c.f32, tmp_path / "q4.gguf", "Q4_0", progress=False).output,)
    else:
        paths = (c.q8,)
    # The third prompt spans several 16-token pages, so its third run reuses them.
    prompts = ["The capital of France is", "Once upon a time, in a land far away,",
               ", ".join(str(i) for i in range(1, 25)) + ","]
    for path in paths:
        with corejax.Session(str(path), keep_alive=0, progress=False) as s:
            assert s.info()["weights"] == "native" and s.info()["architecture"] == ARCH[family]
            alone = [s.generate(p, max_tokens=10, temperature=0, ignore_eos=True).tokens for p in prompts]
            together: dict[int, tuple] = {}

            def run(i: int) -> None:
                together[i] = s.generate(prompts[i], max_tokens=10, temperature=0, ignore_eos=True).tokens

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert [together[i] for i in range(len(prompts))] == alone
            spec = s.generate(prompts[2], max_tokens=10, temperature=0, ignore_eos=True,
                              speculative={"method": "ngram"})
            assert spec.tokens == alone[2]
            assert spec.timings.cached_prompt_tokens > 0  # the third time this prompt ran
            digits = s.generate("A number:", max_tokens=8, regex=r"[0-9]{3}")
            assert len(digits.text) == 3 and digits.text.isdigit() and digits.finish_reason == "stop"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3moe", "phi3"])
def test_family_split_over_devices(family, converted):
    """devices=2 on forced host devices (tests/sharded_run.py): the families whose layers differ most from the
    ones tests/test_sharding.py splits (experts, replicated; Phi-3's fused matrices, split at load like any
    other) give one device's greedy tokens and logits."""
    from test_sharding import run_sharded

    runs = {int(n): r for n, r in run_sharded(family, converted(family).f32, "1,2")["runs"].items()}
    assert runs[2]["tokens"] == runs[1]["tokens"]
    assert runs[2]["max_abs_logit_diff"] <= 1e-4 * max(1.0, runs[1]["max_abs_logit"])
    assert runs[2]["layer_bytes_per_device"] < runs[1]["layer_bytes_per_device"]  # something split
