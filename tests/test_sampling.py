"""Tests of corejax.engine.sampling: parameters, the sampler's properties and its distribution."""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from corejax.errors import InvalidParameterError
from corejax.engine.sampling import PenaltyState, SamplingTensors, apply_penalties, penalty_state, request_key, request_keys, sample, update_penalty_state
from corejax.types.options import MAX_LOGPROBS, SamplingParams

jsample = jax.jit(sample)


def _logits(b: int, v: int, seed: int = 0, scale: float = 3.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, v)).astype(np.float32) * scale)


def _run(logits, params, step=0, state=None, keys=None):
    t = SamplingTensors.from_params(params, logits.shape[-1])
    keys = jnp.asarray(request_keys(params)) if keys is None else keys
    return jsample(logits, t, state, keys, step)


def _tokens_over_steps(logits, params, steps=20):
    keys = jnp.asarray(request_keys(params))
    return np.stack([np.asarray(_run(logits, params, s, keys=keys).tokens) for s in range(steps)], axis=1)


# --------------------------------------------------------------------------------------------------
# Properties of the sampler


def test_temperature_zero_is_argmax():
    logits = _logits(4, 1000)
    params = [SamplingParams(temperature=0.0, top_k=k, seed=i) for i, k in enumerate((0, 5, 40, 1))]
    for step in range(3):
        out = _run(logits, params, step)
        np.testing.assert_array_equal(out.tokens, np.argmax(np.asarray(logits), -1))


def test_top_k_one_is_greedy():
    logits = _logits(4, 1000, seed=1)
    params = [SamplingParams(temperature=t, top_k=1, top_p=p, seed=i)
              for i, (t, p) in enumerate(((0.7, 0.9), (1.5, 1.0), (3.0, 0.5), (1.0, 0.95)))]
    toks = _tokens_over_steps(logits, params, 10)
    np.testing.assert_array_equal(toks, np.repeat(np.argmax(np.asarray(logits), -1)[:, None], 10, 1))


def test_top_k_one_is_greedy_under_ties():
    logits = jnp.asarray([[0.0, 2.0, 1.0, 2.0, 2.0]], jnp.float32)
    toks = _tokens_over_steps(logits, [SamplingParams(temperature=1.0, top_k=1, seed=3)], 10)
    assert (toks == 1).all()


def test_same_seed_reproduces_and_different_seeds_differ():
    logits = _logits(1, 500, seed=2, scale=1.0)
    a = _tokens_over_steps(logits, [SamplingParams(temperature=1.0, seed=11)], 30)
    b = _tokens_over_steps(logits, [SamplingParams(temperature=1.0, seed=11)], 30)
    c = _tokens_over_steps(logits, [SamplingParams(temperature=1.0, seed=12)], 30)
    np.testing.assert_array_equal(a, b)
    assert (a != c).sum() > 10
    assert len(set(a[0].tolist())) > 5  # steps get fresh randomness


@pytest.mark.parametrize("p", [
    SamplingParams(temperature=1.0, seed=7),
    SamplingParams(temperature=0.9, top_k=0, top_p=0.9, seed=7),
    SamplingParams(temperature=1.2, top_k=100, top_p=1.0, min_p=0.0, seed=7),
    SamplingParams(temperature=0.7, top_k=0, top_p=1.0, min_p=0.1, seed=7),
])
def test_row_does_not_depend_on_batch(p):
    v = 2000
    row = _logits(1, v, seed=5, scale=2.0)
    alone = _tokens_over_steps(row, [p], 8)[0]
    others_sets = [
        [SamplingParams(temperature=0.0)],                       # greedy neighbour
        [SamplingParams(temperature=1.0, top_k=0, top_p=0.5)],  # forces the full-vocabulary path
        [SamplingParams(temperature=0.5, top_k=500, seed=1), SamplingParams(seed=2)],  # larger K
    ]
    for others in others_sets:
        for pos in (0, len(others)):
            params = others[:pos] + [p] + others[pos:]
            logits = jnp.concatenate(
                [_logits(pos, v, seed=9), row, _logits(len(others) - pos, v, seed=10)], axis=0)
            got = _tokens_over_steps(logits, params, 8)[pos]
            np.testing.assert_array_equal(got, alone, err_msg=f"{others=} {pos=}")


def test_typed_keys_match_raw_keys_and_per_row_steps():
    logits = _logits(2, 300, seed=4, scale=1.0)
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=2)]
    t = SamplingTensors.from_params(params, 300)
    raw = jnp.asarray(request_keys(params))
    typed = jax.random.wrap_key_data(raw, impl="threefry2x32")
    np.testing.assert_array_equal(jsample(logits, t, None, raw, 3).tokens,
                                  jsample(logits, t, None, typed, 3).tokens)
    per_row = jsample(logits, t, None, raw, jnp.array([3, 5], jnp.int32)).tokens
    assert per_row[0] == jsample(logits, t, None, raw, 3).tokens[0]
    assert per_row[1] == jsample(logits, t, None, raw, 5).tokens[1]
    np.testing.assert_array_equal(request_key(5), jax.random.key_data(jax.random.PRNGKey(5)))


def test_padding_rows_are_greedy():
    t = SamplingTensors.from_params([SamplingParams(seed=0)], 100, batch_size=3)
    assert t.temperature.shape == (3,) and (np.asarray(t.temperature)[1:] == 0).all()
    with pytest.raises(InvalidParameterError, match="batch_size"):
        SamplingTensors.from_params([SamplingParams()] * 2, 100, batch_size=1)


# --------------------------------------------------------------------------------------------------
# Static flags: a few fixed variants; an all-greedy batch runs one argmax


def test_static_flags():
    v = 1000
    g = SamplingTensors.from_params([SamplingParams(temperature=0.0, top_k=0, top_p=0.5)] * 2, v)
    d = SamplingTensors.from_params([SamplingParams(), SamplingParams(temperature=0.0, top_k=0)], v)
    assert d.all_top_k and d.top_k_bound == 64 and not d.needs_full_top_p and not d.any_penalty
    # greedy, the defaults and other top-k/top-p/min-p values below 64 candidates: one program
    for other in ([SamplingParams(top_k=8, top_p=1.0, min_p=0.0, temperature=1.3)], [SamplingParams(top_k=64)]):
        t = SamplingTensors.from_params(other * 2, v)
        assert jax.tree_util.tree_structure(t) == jax.tree_util.tree_structure(d) == jax.tree_util.tree_structure(g)
    f = SamplingTensors.from_params([SamplingParams(), SamplingParams(top_k=0, top_p=0.9)], v)
    assert not f.all_top_k and f.needs_full_top_p
    assert SamplingTensors.from_params([SamplingParams(top_k=5000)], v).top_k_bound == v
    pen = SamplingTensors.from_params([SamplingParams(repetition_penalty=1.1, logprobs=3)], v)
    assert pen.any_penalty and pen.max_logprobs == MAX_LOGPROBS  # the rows keep their own count
    assert SamplingTensors.from_params([SamplingParams(logprobs=0)], v).max_logprobs == 0


def _cond_branches(jaxpr) -> list:
    return [eqn.params["branches"] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "cond"]


def test_all_greedy_batch_is_one_argmax():
    """Greedy and sampled batches share the program; which runs is a lax.cond on the temperatures, and the
    greedy branch holds nothing but the argmax."""
    params = [SamplingParams(temperature=0.0, seed=1)] * 2
    t = SamplingTensors.from_params(params, 1000)
    jaxpr = jax.make_jaxpr(sample)(_logits(2, 1000), t, None, jnp.asarray(request_keys(params)), 0)
    (branches,) = _cond_branches(jaxpr)
    greedy, sampled = (str(b) for b in branches)
    for op in ("threefry", "top_k", "sort", "exp", "log", "cumsum", "while"):
        assert op not in greedy, op
    assert "top_k" in sampled and "threefry" in sampled
    out = jax.jit(sample)(_logits(2, 1000), t, None, jnp.asarray(request_keys(params)), 0)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(_logits(2, 1000)).argmax(-1))
    # the same values in other rows do not recompile: only the static flags are in the treedef
    t2 = SamplingTensors.from_params([SamplingParams(temperature=0.0, top_k=3)] * 2, 1000)
    assert jax.tree_util.tree_structure(t) == jax.tree_util.tree_structure(t2)


# --------------------------------------------------------------------------------------------------
# Distribution


def _reference_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The documented chain in float64: top-k (ties by id) -> top-p (ties kept) -> min-p -> temperature."""
    v = len(logits)
    order = np.lexsort((np.arange(v), -logits))  # descending, lower id first
    keep = np.ones(v, bool)
    if p.top_k:
        keep[:] = False
        keep[order[:p.top_k]] = True
    if p.top_p < 1:
        e = np.where(keep, np.exp(logits - logits.max()), 0.0)
        e /= e.sum()
        cum, cut = 0.0, None
        for i in order:
            if not keep[i]:
                continue
            cum += e[i]
            if cum >= p.top_p - 1e-12:
                cut = logits[i]
                break
        keep &= logits >= cut
    if p.min_p > 0:
        keep &= logits >= logits.max() + math.log(p.min_p)
    z = np.where(keep, logits / p.temperature, -np.inf)
    q = np.exp(z - z.max())
    return q / q.sum()


DIST_LOGITS = np.array([2.0, 1.5, 1.0, 1.0, 1.0, 0.2, -0.5, -3.0], np.float64)


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=0.6, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0),   # top-k cut inside a tie: ids 2 kept, 3, 4 not
    dict(temperature=1.5, top_k=0, top_p=0.6, min_p=0.0),   # full-vocabulary top-p; cut in the tie
    dict(temperature=1.5, top_k=6, top_p=0.6, min_p=0.0),   # candidate-space top-p
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3),
    dict(temperature=0.8, top_k=7, top_p=0.9, min_p=0.05),
    dict(temperature=2.0, top_k=0, top_p=0.97, min_p=0.02),
])
def test_empirical_frequencies_match_truncated_softmax(kw):
    p = SamplingParams(seed=123, **kw)
    expected = _reference_probs(DIST_LOGITS, p)
    n = 40_000
    logits = jnp.broadcast_to(jnp.asarray(DIST_LOGITS, jnp.float32), (n, len(DIST_LOGITS)))
    t = SamplingTensors.from_params([p] * n, len(DIST_LOGITS))
    keys = jnp.broadcast_to(jnp.asarray(request_key(p.seed)), (n, 2))
    toks = np.asarray(jsample(logits, t, None, keys, jnp.arange(n, dtype=jnp.int32)).tokens)
    freq = np.bincount(toks, minlength=len(DIST_LOGITS)) / n
    assert (freq[expected == 0] == 0).all(), (freq, expected)
    # Each frequency within 5 standard errors (a fixed seed makes the test deterministic; a correct
    # sampler fails a 5-sigma bound on some of 8 categories with probability < 1e-5).
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert (np.abs(freq - expected) <= 5 * sigma + 1e-12).all(), (freq, expected)


def test_top_p_keeps_every_tie_at_the_cut():
    # p = .5 is reached inside the three-way tie of 1.0s: all three must be kept, never one or two.
    logits = np.array([1.0, 1.0, 1.0, -5.0], np.float64)
    for top_k in (0, 4):
        p = SamplingParams(temperature=1.0, top_k=top_k, top_p=0.5, min_p=0.0, seed=0)
        expected = _reference_probs(logits, p)
        assert (expected[:3] > 0.33).all()
        n = 3000
        t = SamplingTensors.from_params([p] * n, 4)
        keys = jnp.broadcast_to(jnp.asarray(request_key(0)), (n, 2))
        toks = np.asarray(jsample(jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, 4)), t, None,
                                  keys, jnp.arange(n, dtype=jnp.int32)).tokens)
        assert set(toks.tolist()) == {0, 1, 2}


# --------------------------------------------------------------------------------------------------
# Penalties


def test_penalties_hand_computed():
    logits = jnp.asarray([[2.0, -1.0, 0.5, 3.0, -2.0]], jnp.float32)
    state = penalty_state([([0, 1], [])], 1, 5)  # 4 is neither seen nor counted
    for tok in (3, 3, 1):
        state = update_penalty_state(state, jnp.asarray([tok], jnp.int32))
    np.testing.assert_array_equal(state.counts, [[0, 1, 0, 2, 0]])
    np.testing.assert_array_equal(state.seen, [[True, True, False, True, False]])
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5,
                       presence_penalty=0.25)
    t = SamplingTensors.from_params([p], 5)
    got = apply_penalties(logits, t, state)
    # 0: seen, positive: 2/2; 1: seen, negative: -1*2, minus 0.5*1 and 0.25; 2: untouched;
    # 3: 3/2 - 0.5*2 - 0.25; 4: padding in the prompt, never seen: untouched.
    np.testing.assert_allclose(got, [[1.0, -2.75, 0.5, 0.25, -2.0]], rtol=1e-6)
    out = jsample(logits, t, state, jnp.asarray(request_keys([p])), 0)
    assert int(out.tokens[0]) == 0  # the argmax of the penalised logits, not of the raw ones (3)
    # logprob is of the raw logits
    np.testing.assert_allclose(out.logprob, 0.0)  # logprobs off: reported as 0


def test_update_penalty_state_inactive_rows():
    state = PenaltyState(counts=jnp.zeros((2, 4), jnp.int32), seen=jnp.zeros((2, 4), bool))
    state = update_penalty_state(state, jnp.asarray([1, 2]), active=jnp.asarray([True, False]))
    np.testing.assert_array_equal(state.counts, [[0, 1, 0, 0], [0, 0, 0, 0]])


def test_logit_bias_bans_forces_and_shifts():
    logits = jnp.asarray([[5.0, 4.0, 1.0, 200.0]], jnp.float32)  # token 3 leads by more than 100
    cases = [({3: -100}, 0),       # -100 bans even a lead of 195: the second-best (0) wins
             ({3: -100, 0: -100}, 1),
             ({2: 100}, 3),        # +100 on 1.0 does not beat 200 ...
             ({3: -100, 2: 100}, 2),  # ... but it wins among the rest
             ({0: -50.5, 3: -100}, 1)]
    for bias, expected in cases:
        for temperature in (0.0, 1.0):
            p = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, seed=1,
                               logit_bias=bias)
            t = SamplingTensors.from_params([p], 4)
            assert t.any_penalty
            state = penalty_state([([], [])], 1, 4, [p])
            out = jsample(logits, t, state, jnp.asarray(request_keys([p])), 0)
            if temperature == 0.0:
                assert int(out.tokens[0]) == expected, bias
            assert int(out.tokens[0]) not in [k for k, v in bias.items() if v == -100], bias
    np.testing.assert_array_equal(penalty_state([([], [])], 2, 4, [SamplingParams(logit_bias={1: 2.5})]).bias,
                                  [[0, 2.5, 0, 0], [0, 0, 0, 0]])


def test_logit_bias_validation():
    assert SamplingParams(logit_bias={"7": 1, 3: -2.5}).logit_bias == ((3, -2.5), (7, 1.0))
    assert SamplingParams(logit_bias=[[7, 1]]).logit_bias == ((7, 1.0),)  # the wire's form
    for bad in ({"a": 1}, {-1: 1}, {1: 101}, {1: -100.5}, {1: float("nan")}, {1: "x"}, {True: 1}, "x", [1, 2]):
        with pytest.raises(InvalidParameterError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


# --------------------------------------------------------------------------------------------------
# Logprobs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_are_raw_log_softmax_and_sorted(temperature):
    v = 700
    logits = _logits(3, v, seed=8)
    params = [SamplingParams(temperature=temperature, logprobs=n, seed=i, repetition_penalty=1.3)
              for i, n in enumerate((5, 0, 20))]
    state = penalty_state([([1, 2, 3], [])] * 3, 3, v)
    out = _run(logits, params, 1, state=state)
    ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    toks = np.asarray(out.tokens)
    np.testing.assert_allclose(out.logprob, ref[np.arange(3), toks], rtol=1e-5, atol=1e-6)
    assert out.top_ids.shape == (3, 20) and out.top_logprobs.shape == (3, 20)
    top = np.asarray(out.top_logprobs)
    assert (np.diff(top, axis=-1) <= 0).all()
    np.testing.assert_allclose(top, np.take_along_axis(ref, np.asarray(out.top_ids), -1), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(top, -np.sort(-ref, axis=-1)[:, :20], rtol=1e-5, atol=1e-6)


def test_logprobs_off_shapes():
    out = _run(_logits(2, 50), [SamplingParams(seed=0), SamplingParams(temperature=0.0)])
    assert out.top_ids.shape == (2, 0) and out.top_logprobs.shape == (2, 0)
    assert out.tokens.dtype == jnp.int32


# --------------------------------------------------------------------------------------------------
# Parameter validation


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.95, 0.05)
    assert p.stop == () and p.logprobs is None and p.seed is None and p.max_tokens == 256
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(temperature=1, top_p=1, seed=np.int64(3)).seed == 3
    assert isinstance(SamplingParams(temperature=1).temperature, float)
    assert SamplingParams.from_kwargs(top_k=5).top_k == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.top_k = 3  # type: ignore[misc]


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be"),
    (dict(temperature=float("inf")), "temperature must be"),
    (dict(temperature="1"), "temperature must be"),
    (dict(temperature=10**400), "temperature must be"),
    (dict(temperature=True), "temperature must be"),
    (dict(top_k=-1), r"top_k must be an integer >= 0 \(0 = off\); got -1"),
    (dict(top_k=2.0), "top_k must be an integer"),
    (dict(top_k=True), "top_k must be an integer"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\] \(1 = off\); got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), "top_p must be"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(min_p=1.1), r"min_p must be in \[0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be"),
    (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be"),
    (dict(seed=-1), r"seed must be None or an integer in \[0, 2\*\*64\)"),
    (dict(seed=1.0), "seed must be"),
    (dict(seed=False), "seed must be"),
    (dict(seed=2**64), "seed must be"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(max_tokens=True), "max_tokens must be"),
    (dict(stop=""), "stop must be a string or a list of non-empty strings"),
    (dict(stop=["ok", ""]), "non-empty strings"),
    (dict(stop=[1]), "non-empty strings"),
    (dict(stop=b"x"), "stop must be a string or a list"),
    (dict(logprobs=21), r"logprobs must be None \(off\) or an integer in \[0, 20\]"),
    (dict(logprobs=-1), "logprobs must be"),
    (dict(logprobs=True), "logprobs must be"),
    (dict(ignore_eos=1), "ignore_eos must be True or False"),
])
def test_invalid_parameters_raise(kw, msg):
    with pytest.raises(InvalidParameterError, match=msg):
        SamplingParams(**kw)


def test_from_kwargs_rejects_unknown_names():
    with pytest.raises(InvalidParameterError, match="unknown sampling parameter.*'topk'.*valid names are: "
                       "temperature, top_k, top_p"):
        SamplingParams.from_kwargs(topk=3)


# --------------------------------------------------------------------------------------------------
# Timing (prints the sampler's costs, as docs/MEASUREMENTS.md records them; run with COREJAX_BENCH=1 -s)


@pytest.mark.skipif(not os.environ.get("COREJAX_BENCH"), reason="benchmark; set COREJAX_BENCH=1")
def test_timing():
    settings = {
        "greedy": SamplingParams(temperature=0.0),
        "top-k=40 only": SamplingParams(top_p=1.0, min_p=0.0),
        "top-k+top-p+min-p (defaults)": SamplingParams(),
        "top-p+min-p, no top-k": SamplingParams(top_k=0),
    }
    for v in (49152, 262144):
        logits = _logits(1, v)
        for name, p in settings.items():
            t = SamplingTensors.from_params([p], v)
            keys = jnp.asarray(request_keys([p]))
            jax.block_until_ready(jsample(logits, t, None, keys, 0))
            times = []
            for i in range(200):
                t0 = time.perf_counter()
                jax.block_until_ready(jsample(logits, t, None, keys, i))
                times.append(time.perf_counter() - t0)
            print(f"V={v} {name}: median {1e3 * np.median(times):.3f} ms, min {1e3 * min(times):.3f} ms")
