"""The request path end to end (Session -> tokenizer -> engine -> sampler -> detokenizer -> stop strings) on a
tiny GGUF written by gguf-py, and the same properties once more on the real default model (slow)."""

from __future__ import annotations

import numpy as np
import pytest

import corejax
from corejax.engine.programs import full_logits
from tiny_model import write_tiny_llama

PROMPT = "the cat sat on the mat and then"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", context=128)
    # float32 KV: test_logprobs_are_the_models_log_softmax compares with full_logits, which keeps no cache
    with corejax.Session(str(path), sandbox=False, progress=False, kv_dtype="float32") as session:
        yield session


def test_top_k_1_equals_greedy(tiny):
    greedy = tiny.generate(PROMPT, temperature=0, max_tokens=20, ignore_eos=True)
    top1 = tiny.generate(PROMPT, temperature=1.5, top_k=1, top_p=1.0, min_p=0.0, seed=3, max_tokens=20,
                         ignore_eos=True)
    assert top1.tokens == greedy.tokens and len(greedy.tokens) == 20


def test_same_seed_same_text_other_seed_other_text(tiny):
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=20, ignore_eos=True)
    a = tiny.generate(PROMPT, seed=11, **kw)
    b = tiny.generate(PROMPT, seed=11, **kw)
    c = tiny.generate(PROMPT, seed=12, **kw)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens


def test_stop_string_across_token_boundaries_ends_text_exactly(tiny):
    full = tiny.generate(PROMPT, temperature=0, max_tokens=30, ignore_eos=True)
    assert len(full.text) > 8
    stop = full.text[3:8]  # five characters: several of this vocab's one- and two-byte tokens
    cut = tiny.generate(PROMPT, temperature=0, max_tokens=30, ignore_eos=True, stop=[stop, "never-there"])
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop" and len(cut.tokens) < len(full.tokens)
    assert "".join(tiny.stream(PROMPT, temperature=0, max_tokens=30, ignore_eos=True, stop=stop)) == cut.text


def test_stream_pieces_join_to_generate_text(tiny):
    result = tiny.generate(PROMPT, seed=5, max_tokens=25)
    pieces = list(tiny.stream(PROMPT, seed=5, max_tokens=25))
    assert "".join(pieces) == result.text and len(pieces) > 1
    assert result.text == tiny.detokenize(result.tokens)  # special tokens are not text


def test_max_tokens_eos_and_finish_reasons(tiny):
    r = tiny.generate(PROMPT, temperature=0, max_tokens=7, ignore_eos=True)
    assert r.finish_reason == "length" and len(r.tokens) == 7
    eos = tiny._runtime.tokenizer.eos_ids  # <|im_end|> and <|endoftext|> in the tiny vocab
    assert {266, 268} <= eos
    stopped = [tiny.generate(PROMPT, seed=s, max_tokens=60) for s in range(8)]
    ended = [r for r in stopped if r.finish_reason == "stop"]
    assert ended, "no seed produced the end-of-sequence token in 60 tokens"
    for r in ended:
        assert r.tokens[-1] in eos and not eos & set(r.tokens[:-1])
        assert "<|im_end|>" not in r.text and "<|endoftext|>" not in r.text


def test_context_is_never_exceeded(tiny):
    prompt_len = len(tiny.tokenize(PROMPT))
    r = tiny.generate(PROMPT, temperature=0, max_tokens=500, ignore_eos=True)
    assert r.finish_reason == "length" and len(r.tokens) == 128 - prompt_len


def test_logprobs_are_the_models_log_softmax(tiny):
    r = tiny.generate(PROMPT, temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
    assert r.logprobs is not None and len(r.logprobs) == 6
    runtime = tiny._runtime
    ids = np.array([list(r.prompt_tokens) + list(r.tokens)], np.int32)
    logits = np.asarray(full_logits(runtime.model.params, ids, cfg=runtime.model.cfg))[0]
    n = len(r.prompt_tokens)
    for i, lp in enumerate(r.logprobs):
        row = logits[n - 1 + i].astype(np.float64)
        ref = row - np.log(np.exp(row - row.max()).sum()) - row.max()
        assert lp.token == r.tokens[i] and abs(lp.logprob - ref[lp.token]) < 1e-4
        assert [t for t, _ in lp.top] == list(np.argsort(-ref)[:3])
        assert lp.top[0][0] == lp.token  # greedy picks the most likely token
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))


def test_penalties_change_greedy_text_and_reduce_repeats(tiny):
    plain = tiny.generate(PROMPT, temperature=0, max_tokens=40, ignore_eos=True)
    penalised = tiny.generate(PROMPT, temperature=0, max_tokens=40, ignore_eos=True, presence_penalty=2.0,
                              repetition_penalty=1.5)
    assert len(set(penalised.tokens)) > len(set(plain.tokens))


def test_chat_messages_use_the_template(tiny):
    messages = [{"role": "user", "content": "hi"}]
    r = tiny.generate(messages=messages, temperature=0, max_tokens=5)
    expected = tiny.tokenize("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special=False)
    assert list(r.prompt_tokens) == expected


def test_result_timings(tiny):
    r = tiny.generate(PROMPT, temperature=0, max_tokens=10, ignore_eos=True)
    t = r.timings
    assert t.prompt_tokens == len(r.prompt_tokens) and t.generated_tokens == 10
    assert 0 < t.time_to_first_token_s <= t.total_s and t.decode_tokens_per_s > 0 and t.load_s > 0
    assert str(r) == r.text


# -- the real default model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    with corejax.Session(str(smollm2_gguf), progress=False) as session:
        yield session


@pytest.mark.slow
def test_real_model_sampling_properties(smollm2):
    prompt = "The old lighthouse keeper"
    greedy = smollm2.generate(prompt, temperature=0, max_tokens=24)
    top1 = smollm2.generate(prompt, temperature=0.9, top_k=1, seed=1, max_tokens=24)
    assert top1.tokens == greedy.tokens
    a = smollm2.generate(prompt, temperature=0.9, seed=42, max_tokens=24)
    b = smollm2.generate(prompt, temperature=0.9, seed=42, max_tokens=24)
    assert a.text == b.text
    stop = greedy.text[5:12]
    cut = smollm2.generate(prompt, temperature=0, max_tokens=24, stop=stop)
    assert cut.text == greedy.text[: greedy.text.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.slow
def test_real_model_chat_answers(smollm2):
    r = smollm2.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                         temperature=0, max_tokens=30)
    assert "Paris" in r.text and r.finish_reason == "stop"
