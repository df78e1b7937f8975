"""Continuous batching (corejax/serving/scheduler.py) on the tiny model: batched == alone, preemption, cancellation,
FIFO admission, and property tests under random arrivals and cancellations."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corejax
from corejax.engine.programs import programs_built
from corejax.types.config import EngineConfig
from corejax.types.options import SamplingParams
from corejax.errors import CacheFullError, InvalidParameterError
from corejax.hub import ModelSource
from corejax.worker.generator import Generator
from corejax.worker.start import open_runtime
from corejax.serving.pacing import INTERLEAVE_FLOOR, PrefillPacer
from corejax.serving.scheduler import Scheduler
from tiny_model import write_tiny_llama

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = ["the cat sat on the mat " * k + f"story {k}" for k in range(1, 9)]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("sched") / "tiny.gguf", context=256)


@pytest.fixture(scope="module")
def runtime(tiny_path):
    return open_runtime(ModelSource("tiny", "gguf", tiny_path), progress=False)


def scheduler(runtime: Generator, **engine_kw) -> Scheduler:
    """A fresh engine (page pool) over the runtime's params, stepped by the test itself."""
    from corejax.serving.runner import ModelRunner

    engine = ModelRunner(runtime.model.cfg, runtime.model.params, EngineConfig(**engine_kw))
    return Scheduler(engine, background=False)


def alone(runtime: Generator, prompt: list[int], sp: SamplingParams = GREEDY) -> list[int]:
    sch = scheduler(runtime)
    req = sch.submit(prompt, sp, frozenset())
    sch.run_until_idle()
    return [e.token for e in req]


def assert_pool_clean(sch: Scheduler) -> None:
    alloc = sch.runner.allocator
    assert not alloc._seqs, "a sequence was left allocated"
    assert int(alloc.refcount.sum()) == 0, "a page is still referenced"
    assert alloc.num_available == alloc.num_pages - 1, "a page was lost"


def test_batched_greedy_equals_alone(runtime):
    prompts = [runtime.tokenizer.encode(p) for p in PROMPTS]
    expected = [alone(runtime, p) for p in prompts]
    sch = scheduler(runtime)
    reqs = [sch.submit(p, GREEDY, frozenset()) for p in prompts]
    sch.run_until_idle()
    assert [[e.token for e in r] for r in reqs] == expected
    assert_pool_clean(sch)


def test_requests_join_a_running_batch(runtime):
    """A request submitted while others decode joins between steps and still gets its own tokens."""
    prompts = [runtime.tokenizer.encode(p) for p in PROMPTS[:4]]
    expected = [alone(runtime, p) for p in prompts]
    sch = scheduler(runtime)
    reqs = [sch.submit(prompts[0], GREEDY, frozenset())]
    for p in prompts[1:]:
        for _ in range(3):
            sch.step()
        reqs.append(sch.submit(p, GREEDY, frozenset()))
    sch.run_until_idle()
    assert [[e.token for e in r] for r in reqs] == expected


ROW_PARAMS = {
    "sampled": [SamplingParams(temperature=0.9, top_k=20, seed=i, max_tokens=16, ignore_eos=True) for i in range(5)],
    "penalised": [SamplingParams(temperature=0.0, repetition_penalty=1.3 + 0.2 * i, frequency_penalty=0.5,
                                 max_tokens=16, ignore_eos=True) for i in range(3)],
}


@pytest.mark.parametrize("kind", sorted(ROW_PARAMS))
def test_each_row_follows_its_own_sampling_in_a_batch(runtime, kind):
    """Seeded sampling and penalties are per row: a batch gives every row what it gets alone."""
    params = ROW_PARAMS[kind]
    prompts = [runtime.tokenizer.encode(p) for p in PROMPTS[:len(params)]]
    expected = [alone(runtime, p, sp) for p, sp in zip(prompts, params)]
    sch = scheduler(runtime)
    reqs = [sch.submit(p, sp, frozenset()) for p, sp in zip(prompts, params)]
    sch.run_until_idle()
    assert [[e.token for e in r] for r in reqs] == expected


def test_preemption_by_recompute_keeps_the_text(runtime):
    """A pool too small for every sequence at once: some are preempted, and all still get their tokens."""
    prompts = [runtime.tokenizer.encode(p) for p in PROMPTS[:6]]
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = [alone(runtime, p, sp) for p in prompts]
    sch = scheduler(runtime, page_size=8, kv_cache_tokens=8 * 24, prefix_cache=False)
    reqs = [sch.submit(p, sp, frozenset()) for p in prompts]
    sch.run_until_idle()
    assert sch.preemptions > 0
    assert [[e.token for e in r] for r in reqs] == expected
    assert sum(r.times.preempted for r in reqs) == sch.preemptions
    assert_pool_clean(sch)


def test_a_request_larger_than_the_pool_fails_alone(runtime):
    sch = scheduler(runtime, page_size=8, kv_cache_tokens=32)
    big = sch.submit(runtime.tokenizer.encode(PROMPTS[7]), GREEDY, frozenset())
    small = sch.submit(runtime.tokenizer.encode("hi"), SamplingParams(temperature=0.0, max_tokens=4), frozenset())
    sch.run_until_idle()
    with pytest.raises(CacheFullError, match="raise the KV cache size"):
        list(big)
    assert len(list(small)) >= 1
    assert_pool_clean(sch)


def test_cancel_frees_pages_at_the_next_step(runtime):
    sch = scheduler(runtime)
    long = sch.submit(runtime.tokenizer.encode(PROMPTS[3]), SamplingParams(max_tokens=200, ignore_eos=True),
                      frozenset())
    for _ in range(4):
        sch.step()
    assert sch.runner.allocator._seqs
    long.close()
    sch.step()
    assert 0 < len(list(long)) < 200 and list(long) == []
    assert not sch.runner.allocator._seqs
    assert_pool_clean(sch)


def test_fifo_admission_when_the_pool_is_short(runtime):
    """The head of the queue is not overtaken by smaller requests behind it (no starvation)."""
    sch = scheduler(runtime, page_size=8, kv_cache_tokens=8 * 12, prefix_cache=False)
    tok = runtime.tokenizer
    first = sch.submit(tok.encode(PROMPTS[2]), SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                       frozenset())
    sch.step()
    big = sch.submit(tok.encode(PROMPTS[4]), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                     frozenset())
    small = sch.submit(tok.encode("hi"), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), frozenset())
    sch.step()
    assert big in sch.waiting and small in sch.waiting  # small waits behind big although it would fit
    sch.run_until_idle()
    assert all(len(list(r)) > 0 for r in (first, big, small))



def test_pacer_sizes_a_steps_prefill_by_its_measured_time():
    """Whole chunks with nothing decoding; while decoding, the largest power of two whose estimated time fits
    the stall budget, never below the floor; the first call of a shape (its compile) is not a measurement."""
    pacer = PrefillPacer(512, max_stall=0.5, floor=32)
    assert pacer.budget(decoding=False) == 512
    assert pacer.budget(decoding=True) == 32  # nothing timed yet: the floor
    pacer.timed((4, 128), 9.0)  # compiling
    assert pacer.budget(decoding=True) == 32
    pacer.timed((4, 128), 0.6)
    assert pacer.estimate(512) == pytest.approx(0.6) and pacer.estimate(128) == pytest.approx(0.15)
    assert pacer.budget(decoding=True) == 256
    pacer.max_stall = 1.0
    assert pacer.budget(decoding=True) == 512
    pacer.max_stall = 0.001
    assert pacer.budget(decoding=True) == 32
    pacer.timed((1, 32), 0.01)
    pacer.timed((1, 32), 0.01)  # the nearest timed size is the one used
    assert pacer.estimate(32) == pytest.approx(0.01) and pacer.estimate(64) == pytest.approx(0.02)
    pacer.max_stall = 0.05
    # 64 tokens: 0.02 s, scaled from the 32-token call; 128 tokens (as near 512 as 32): 0.15 s, from the larger one
    assert pacer.budget(decoding=True) == 64
    with pytest.raises(InvalidParameterError):
        EngineConfig(max_prefill_stall=0)


def paced(runtime: Generator, stall: float, chunk: int = 128) -> tuple[Scheduler, list[tuple[int, int]]]:
    """A scheduler whose prefill calls are logged as (prompt tokens fed, sequences decoding meanwhile)."""
    sch = scheduler(runtime, prefill_chunk=chunk, max_prefill_stall=stall, prefix_cache=False,  # every token fed
                    kv_cache_tokens=1024)  # room for all at once (the default pool is one context: 256)
    calls: list[tuple[int, int]] = []
    prefill = sch.runner.prefill

    def logged(batch, *args, **kwargs):
        calls.append((int((batch.lengths - batch.positions[:, 0])[:batch.rows].sum()), len(sch.running)))
        return prefill(batch, *args, **kwargs)

    sch.runner.prefill = logged
    return sch, calls


def test_a_prompt_joining_running_decodes_is_prefilled_in_paced_parts(runtime):
    """With three sequences decoding and a tiny stall budget, a long prompt is prefilled `interleave_floor`
    tokens per step, finishes in ceil(len / floor) steps, and every text is the text it gets alone."""
    tok = runtime.tokenizer
    short = [tok.encode(p) for p in PROMPTS[:3]]
    long = tok.encode(PROMPTS[4] + " " + PROMPTS[7])
    assert 160 < len(long) < 256 - 40  # the tiny model's context: 256
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = [alone(runtime, p, sp) for p in [*short, long]]
    sch, calls = paced(runtime, stall=1e-6)
    reqs = [sch.submit(p, sp, frozenset()) for p in short]
    sch.step()
    assert calls == [(sum(map(len, short)), 0)]  # nothing decoding: one call takes them all
    reqs.append(sch.submit(long, sp, frozenset()))
    steps = 0
    while reqs[-1] in (*sch.waiting, *sch.prefilling) or not steps:
        sch.step()
        steps += 1
    parts = calls[1:]
    assert all(fed <= INTERLEAVE_FLOOR and decoding == 3 for fed, decoding in parts), parts
    assert sum(fed for fed, _ in parts) == len(long) and steps == -(-len(long) // INTERLEAVE_FLOOR)
    sch.run_until_idle()
    assert [[e.token for e in r] for r in reqs] == expected
    assert_pool_clean(sch)


def test_a_generous_stall_budget_prefills_whole_chunks_while_decoding(runtime):
    tok = runtime.tokenizer
    long = tok.encode(PROMPTS[4] + " " + PROMPTS[7])
    sch, calls = paced(runtime, stall=30.0)
    sch.pacer.seconds = {128: 0.05}  # as if a 128-token call had been timed
    first = sch.submit(tok.encode(PROMPTS[0]), GREEDY, frozenset())
    sch.step()
    second = sch.submit(long, GREEDY, frozenset())
    sch.run_until_idle()
    assert [fed for fed, decoding in calls if decoding] == [128, len(long) - 128]
    assert len(list(first)) == len(list(second)) == GREEDY.max_tokens

def test_a_prompt_cancelled_mid_prefill_leaves_no_unwritten_page_for_reuse(runtime):
    """A prompt prefilled in chunks declares its pages to the prefix cache only as their KV is written: a longer
    prompt with the same start, after the first was cancelled between chunks, gets its text alone (it once read
    the never-written pages of the cancelled prompt's later chunks)."""
    tok = runtime.tokenizer
    first, long = tok.encode(PROMPTS[4]), tok.encode(PROMPTS[7])
    shared = next(i for i, (a, b) in enumerate(zip(first, long)) if a != b)
    assert shared >= 32  # more than one 16-token page in common
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    expected = alone(runtime, long, sp)
    sch = scheduler(runtime, page_size=16)
    decoding = sch.submit(tok.encode(PROMPTS[0]), GREEDY, frozenset())
    for _ in range(3):
        sch.step()
    cancelled = sch.submit(first, sp, frozenset())
    sch.step()
    assert 0 < cancelled.computed < len(first)  # stopped between two of its chunks
    cancelled.close()
    later = sch.submit(long, sp, frozenset())
    sch.run_until_idle()
    assert [e.token for e in later] == expected
    assert len(list(decoding)) == GREEDY.max_tokens
    assert_pool_clean(sch)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(1, 20), st.integers(0, 6), st.booleans(),
                          st.sampled_from([None, "ngram"])), min_size=1, max_size=10),
       st.sampled_from([(8, 96), (16, 4096)]))
def test_random_arrivals_and_cancellations(runtime, plan, pool):
    """No request lost or duplicated, every page returned, every finished request's tokens as if alone."""
    page_size, tokens = pool
    sch = scheduler(runtime, page_size=page_size, kv_cache_tokens=tokens)
    tok = runtime.tokenizer
    reqs = []
    for prompt_i, max_tokens, wait, cancel, method in plan:
        for _ in range(wait):
            sch.step()
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        spec = None if method is None else corejax.SpeculativeConfig(method=method, k=3)
        req = sch.submit(tok.encode(PROMPTS[prompt_i]), sp, frozenset(), spec)
        reqs.append((req, prompt_i, max_tokens, cancel))
        if cancel:
            sch.step()
            req.close()
    sch.run_until_idle()
    for req, prompt_i, max_tokens, cancel in reqs:
        assert req.finished
        try:
            got = [e.token for e in req]
        except CacheFullError:
            assert page_size * (sch.runner.allocator.num_pages - 1) < len(tok.encode(PROMPTS[prompt_i])) + max_tokens
            continue
        if not cancel:
            sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            assert got == alone(runtime, tok.encode(PROMPTS[prompt_i]), sp)
    assert_pool_clean(sch)


def test_session_threads_and_asyncio_stream_concurrently(tiny_path):
    import asyncio

    with corejax.Session(str(tiny_path), sandbox=False) as s:
        kw = dict(max_tokens=20, temperature=0.0, ignore_eos=True)
        expected = [s.generate(p, **kw).tokens for p in PROMPTS[:4]]
        got: dict[int, tuple] = {}
        started = threading.Barrier(4)

        def run(i: int) -> None:
            started.wait()
            pieces = list(s.stream_chunks(PROMPTS[i], **kw))
            got[i] = pieces[-1].result.tokens

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[i] for i in range(4)] == expected

        async def main():
            async def one(p):
                return [c async for c in s.astream(p, **kw)]
            return await asyncio.gather(*(one(p) for p in PROMPTS[:4]))

        texts = asyncio.run(main())
        assert ["".join(t) for t in texts] == [s.generate(p, **kw).text for p in PROMPTS[:4]]


def test_batch_sizes_are_bucketed(runtime):
    """Three rows run as a batch of four; the compiled decode programs stay few across batch sizes."""
    sch = scheduler(runtime)
    tok = runtime.tokenizer
    before = programs_built()["_decode_step"]
    reqs = [sch.submit(tok.encode(p), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), frozenset())
            for p in PROMPTS[:3]]
    sch.run_until_idle()
    assert all(len(list(r)) == 6 for r in reqs)
    assert programs_built()["_decode_step"] - before <= 3  # B in {1, 2, 4}: at most one program per bucket
    assert np.all(sch.runner.allocator.refcount == 0)


EXIT_SCRIPT = """
import atexit, sys, threading
# Registered before corejax's own hook, so it runs after it (atexit is last in, first out).
atexit.register(lambda: print("scheduler threads at exit:",
                              sum(t.name == "corejax-scheduler" for t in threading.enumerate()), flush=True))
from corejax.hub import ModelSource
from corejax.types.options import SamplingParams
from corejax.worker.generator import Generator
from corejax.worker.start import open_runtime
from pathlib import Path
rt = open_runtime(ModelSource("tiny", "gguf", Path(sys.argv[1])), progress=False)
stream = rt.stream("the cat sat", None, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
next(iter(stream))  # the scheduler thread is mid-request, holding device arrays, when the script ends
print("exiting", flush=True)
"""


def test_exit_ends_the_scheduler_thread_first(tiny_path):
    """A script that ends while its scheduler thread holds JAX arrays exits cleanly: the thread is ended by an
    atexit hook. Left to interpreter finalization, the thread's last array release could run after Python froze
    its threads and abort the process from XLA's C++ ("FATAL: exception not rethrown"; seen in about 1 of 10
    runs of tests/sharded_run.py)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tiny_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-2:] == ["exiting", "scheduler threads at exit: 0"], out.stdout


def test_warm_batches_leave_nothing_to_compile_when_streams_join_and_leave(tiny_path):
    """warmup(batches=True) builds every batch and chunk bucket first, so streams that join and leave a running
    batch, with prompts of different lengths, compile nothing, and each still gets its text alone."""
    runtime = open_runtime(ModelSource("tiny", "gguf", tiny_path), progress=False,
                           engine=EngineConfig(prefill_chunk=128))
    runtime.scheduler_max_batch = 4
    sp = SamplingParams(temperature=0.0, ignore_eos=True)
    prompts = [PROMPTS[k] for k in (0, 7, 2, 5, 1)]

    def text(rt: Generator, prompt: str, max_tokens: int) -> str:
        return "".join(c.text for c in rt.stream(prompt, None, dataclasses.replace(sp, max_tokens=max_tokens)))

    ref = open_runtime(ModelSource("tiny", "gguf", tiny_path), progress=False)  # its own programs
    expected = [text(ref, p, 6 + 3 * i) for i, p in enumerate(prompts)]
    shapes = runtime.runner.batch_shapes(4)
    assert ("decode", 4, 1) in shapes and ("prefill", 4, 128) in shapes and ("prefill_part", 1, 64) in shapes
    runtime.warmup(batches=True)
    before = programs_built()
    got: list[str | None] = [None] * len(prompts)

    def run(i: int) -> None:
        got[i] = text(runtime, prompts[i], 6 + 3 * i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for i, t in enumerate(threads):  # staggered: rows join a decoding batch, and leave it at different steps
        t.start()
        if i % 2:
            time.sleep(0.05)
    for t in threads:
        t.join(60)
    after = programs_built()
    assert got == expected
    assert (after["_prefill"] - before["_prefill"], after["_decode_step"] - before["_decode_step"]) == (0, 0)
