"""Speculative decoding (corejax/serving/speculative.py): proposers, rollback, identity with plain decoding, and a
chi-square test that speculative sampling follows the target model's distribution."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import corejax
from corejax.types.config import EngineConfig
from corejax.types.options import SamplingParams, SpeculativeConfig
from corejax.engine.programs import full_logits
from corejax.serving.runner import ModelRunner
from corejax.errors import InvalidParameterError
from corejax.hub import ModelSource
from corejax.serving.paging import PageAllocator
from corejax.worker.generator import Generator
from corejax.worker.start import open_runtime
from corejax.serving.scheduler import Scheduler
from corejax.serving.speculative import best_k, ngram_propose
from tiny_model import write_tiny_llama

REPEATING = ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return",
             "the cat sat on the mat. the cat sat on the mat. the cat sat on",
             "one two three four five one two three four five one two"]
FREE = ["Once upon a time", "hello world"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    return (write_tiny_llama(d / "target.gguf", context=256),
            write_tiny_llama(d / "draft.gguf", context=256, seed=1, layers=1))


@pytest.fixture(scope="module")
def runtime(paths):
    return open_runtime(ModelSource("target", "gguf", paths[0]), progress=False)


def run(runtime: Generator, prompt: str, spec: dict | None, **sampling) -> tuple[list[int], Scheduler]:
    sch = Scheduler(ModelRunner(runtime.model.cfg, runtime.model.params, EngineConfig()), background=False,
                    draft_loader=runtime._load_draft)
    sp = SamplingParams(**{"temperature": 0.0, "max_tokens": 32, "ignore_eos": True, **sampling})
    req = sch.submit(runtime.tokenizer.encode(prompt), sp, frozenset(), SpeculativeConfig.from_user(spec))
    sch.run_until_idle()
    return [e.token for e in req], sch, req


# --- proposers and k ---------------------------------------------------------------------------------------

def test_ngram_proposes_what_followed_the_latest_match():
    ctx = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert ngram_propose(ctx, 2, 3, 1) == [7, 8]  # the later "1 2 3" wins
    assert ngram_propose(ctx, 10, 3, 1) == [7, 8, 5, 1, 2, 3]  # up to the end of the context
    assert ngram_propose([4, 5, 6, 7], 3, 3, 1) == []
    assert ngram_propose([5, 6, 5], 3, 2, 1) == [6, 5]  # falls back to shorter suffixes
    assert ngram_propose([5, 6, 5], 3, 2, 2) == []


def test_best_k_follows_the_acceptance_rate():
    assert best_k(0.0, 7) == 0
    assert best_k(0.2, 7) == 0  # a verify costs more than the 1.25 tokens it would yield
    assert best_k(0.95, 7) == 7
    assert best_k(0.4, 7) == 3  # 1.62 tokens for 1.42 steps
    assert best_k(0.8, 7, draft_cost=0.9) < best_k(0.8, 7)  # a costly draft drafts less
    assert best_k(0.9, 5) in (0, 1, 3, 5)


def test_truncate_rolls_back_pages_and_hashes():
    alloc = PageAllocator(16, 4)
    alloc.allocate(1, list(range(6)))
    alloc.append(1, [100, 101, 102, 103, 104])  # 11 tokens: pages 0-1 full, page 2 partly
    pages = alloc.pages(1)
    assert len(pages) == 3 and alloc.is_cached(pages[1])
    alloc.truncate(1, 7)  # drops 4 rejected tokens: page 1 holds 3 valid tokens, page 2 goes back
    assert alloc.pages(1) == pages[:2] and alloc.num_tokens(1) == 7
    assert not alloc.is_cached(pages[1]) and alloc.refcount[pages[2]] == 0
    alloc.append(1, [200])
    assert alloc.is_cached(pages[1])  # full again, hashed over the new tokens
    alloc.allocate(2, list(range(4)) + [4, 5, 100, 200, 9])
    assert alloc.pages(2)[:2] == pages[:2]  # the re-hashed page is found by the new chain
    with pytest.raises(ValueError):
        alloc.truncate(1, 99)


def test_config_validation():
    with pytest.raises(InvalidParameterError, match="'ngram' or 'draft'"):
        SpeculativeConfig.from_user({"method": "medusa"})
    with pytest.raises(InvalidParameterError, match="k must be"):
        SpeculativeConfig.from_user({"method": "ngram", "k": 0})
    with pytest.raises(InvalidParameterError, match="needs draft_model"):
        SpeculativeConfig.from_user({"method": "draft"})
    with pytest.raises(InvalidParameterError, match="keys"):
        SpeculativeConfig.from_user({"method": "ngram", "depth": 3})
    with pytest.raises(InvalidParameterError, match="must be a dict"):
        SpeculativeConfig.from_user("ngram")


# --- identity with plain decoding ----------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", REPEATING + FREE)
def test_ngram_greedy_is_plain_greedy(runtime, prompt):
    plain, _, _ = run(runtime, prompt, None)
    spec, _, req = run(runtime, prompt, {"method": "ngram", "k": 4})
    assert spec == plain


def test_ngram_drafts_are_accepted_on_repeating_text(runtime):
    accepted = 0
    for prompt in REPEATING:
        _, _, req = run(runtime, prompt, {"method": "ngram", "k": 4, "ngram_min": 1}, max_tokens=48)
        assert req.times.drafted > 0
        accepted += req.times.accepted
    assert accepted > 0


@pytest.mark.parametrize("prompt", REPEATING[:2] + FREE[:1])
def test_draft_model_greedy_is_plain_greedy(runtime, paths, prompt):
    plain, _, _ = run(runtime, prompt, None)
    spec, sch, req = run(runtime, prompt, {"method": "draft", "draft_model": str(paths[1]), "k": 3})
    assert spec == plain
    assert req.times.drafted > 0
    proposer = next(iter(sch.speculation.proposers.values()))
    assert not proposer.runner.allocator._seqs  # the draft's sequence was released with the request


def test_same_model_lower_precision_draft(runtime):
    plain, _, _ = run(runtime, REPEATING[1], None)
    spec, _, req = run(runtime, REPEATING[1], {"method": "draft", "draft_weights": "int8", "k": 4})
    assert spec == plain
    assert req.times.accepted > 0  # an int8 copy of the model agrees with it most of the time


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_seeded_sampling_is_token_for_token_plain_sampling(runtime, paths, method):
    spec = {"method": method, "k": 3} | ({"draft_model": str(paths[1])} if method == "draft" else {})
    for seed in range(3):
        kw = dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        assert run(runtime, REPEATING[2], spec, **kw)[0] == run(runtime, REPEATING[2], None, **kw)[0]


def test_penalised_requests_do_not_speculate(runtime):
    plain, _, _ = run(runtime, REPEATING[1], None, repetition_penalty=1.3)
    spec, _, req = run(runtime, REPEATING[1], {"method": "ngram"}, repetition_penalty=1.3)
    assert spec == plain and req.times.drafted == 0


def test_speculative_sampling_follows_the_target_distribution(runtime, paths):
    """Chi-square over the joint law of the first three tokens, drafted greedily by an int8 copy of the
    target (accepted about as often as rejected at this temperature), against the exact law computed from
    the target's logits."""
    cfg, params, tok = runtime.model.cfg, runtime.model.params, runtime.tokenizer
    prompt = tok.encode("the cat")
    top_k = 3

    def law(context: list[int]) -> dict[int, float]:
        logits = np.asarray(full_logits(params, np.asarray([context], np.int32), cfg=cfg))[0, -1]
        ids = np.argsort(-logits, kind="stable")[:top_k]
        p = np.exp(logits[ids] - logits[ids].max())
        return dict(zip(ids.tolist(), (p / p.sum()).tolist()))

    exact: dict[tuple, float] = {}
    for t1, p1 in law(prompt).items():
        for t2, p2 in law(prompt + [t1]).items():
            for t3, p3 in law(prompt + [t1, t2]).items():
                exact[(t1, t2, t3)] = p1 * p2 * p3

    n = 1200
    sch = Scheduler(ModelRunner(cfg, params, EngineConfig()), background=False, draft_loader=runtime._load_draft)
    spec = SpeculativeConfig(method="draft", draft_weights="int8", k=2, adaptive=False)
    reqs = [sch.submit(prompt, SamplingParams(temperature=1.0, top_k=top_k, top_p=1.0, min_p=0.0, seed=s,
                                              max_tokens=3, ignore_eos=True), frozenset(), spec) for s in range(n)]
    sch.run_until_idle()
    counts = collections.Counter(tuple(e.token for e in r) for r in reqs)
    assert sum(r.times.drafted for r in reqs) > n // 2  # drafts really were verified
    assert 0 < sum(r.times.accepted for r in reqs) < sum(r.times.drafted for r in reqs)
    assert set(counts) <= set(exact)
    # Pool cells expected fewer than 5 times into one, then Pearson's statistic.
    big = [c for c in exact if exact[c] * n >= 5]
    obs = [counts[c] for c in big] + [n - sum(counts[c] for c in big)]
    exp = [exact[c] * n for c in big] + [n * (1 - sum(exact[c] for c in big))]
    obs, exp = np.asarray(obs, float), np.asarray(exp, float)
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    # 99.9th percentile of chi-square(df) by the Wilson-Hilferty approximation (no scipy needed).
    z = 3.090
    critical = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    assert stat < critical, (stat, critical, df)


# --- public API ----------------------------------------------------------------------------------------------

def test_session_speculative_option_and_timings(paths):
    with corejax.Session(str(paths[0]), sandbox=False, speculative={"method": "ngram", "k": 4}) as s:
        kw = dict(max_tokens=40, temperature=0.0, ignore_eos=True)
        r = s.generate(REPEATING[1], **kw)
        plain = s.generate(REPEATING[1], speculative=None, **kw)
        assert r.tokens == plain.tokens
        assert r.timings.draft_tokens > 0 and plain.timings.draft_tokens == 0
        assert 0 <= r.timings.accepted_draft_tokens <= r.timings.draft_tokens
        with pytest.raises(InvalidParameterError):
            s.generate("x", speculative={"method": "ngram", "k": 99})


def test_sandboxed_draft_model_must_be_declared(paths):
    with corejax.Session(str(paths[0]), speculative={"method": "draft", "draft_model": str(paths[1])}) as s:
        kw = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
        assert s.generate(REPEATING[0], **kw).tokens == s.generate(REPEATING[0], speculative=None, **kw).tokens
    with corejax.Session(str(paths[0])) as s:
        with pytest.raises(InvalidParameterError, match="not declared"):
            s.generate("x", speculative={"method": "draft", "draft_model": str(paths[1])})

