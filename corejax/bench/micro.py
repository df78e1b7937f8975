"""Micro suite: the hot host-side pieces, µs per call — protocol codec, page allocator, sampler (host set-up
and the jitted device call), tokenizer (encode a 1 KiB document, stream-decode it token by token).

`cases(tokenizer)` returns plain callables; the bench times them with `time_per_call` (several batches, each
long enough for the clock, one sample per batch), and benchmarks/test_micro.py hands the same callables to
pytest-benchmark.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

Case = Callable[[], Any]


def time_per_call(fn: Case, *, batches: int = 5, min_batch_s: float = 0.05) -> list[float]:
    """µs per call of fn, one sample per batch; the loop count per batch is calibrated to min_batch_s."""
    fn()
    loops = 1
    while True:
        t = time.perf_counter()
        for _ in range(loops):
            fn()
        took = time.perf_counter() - t
        if took >= min_batch_s or loops >= 1 << 20:
            break
        loops = max(loops * 2, int(loops * min_batch_s / max(took, 1e-9)))
    out = []
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(loops):
            fn()
        out.append((time.perf_counter() - t) / loops * 1e6)
    return out


def codec_cases() -> dict[str, Case]:
    from corejax.types.results import Chunk, GenerationResult, Timings, TokenLogprob
    from corejax.wire import messages as m
    from corejax.wire import protocol as p
    from corejax.wire.protocol import Kind

    timings = Timings(**{f.name: 1 for f in dataclasses.fields(Timings)})
    lp = tuple(TokenLogprob(i, "tok", -0.5, ((i, -0.5), (i + 1, -1.0)), ("tok", "tok2")) for i in range(32))
    result = GenerationResult("x" * 200, tuple(range(32)), "length", tuple(range(64)), timings, lp)
    messages = {
        "chunk": (Kind.CHUNK, m.chunk_to_wire(Chunk(" world", (1917,)))),
        "result+logprobs": (Kind.RESULT, {"result": m.result_to_wire(result)}),
        "ping": (Kind.PING, {}),
    }
    out: dict[str, Case] = {}
    for name, (kind, payload) in messages.items():
        frame = p.encode(kind, 7, payload)
        out[f"protocol encode {name} ({len(frame)} B)"] = lambda kind=kind, payload=payload: p.encode(kind, 7, payload)
        out[f"protocol decode {name} ({len(frame)} B)"] = lambda frame=frame: p.decode(frame)
    return out


def allocator_cases() -> dict[str, Case]:
    from corejax.serving.paging import PageAllocator

    alloc = PageAllocator(num_pages=4096, page_size=16)
    prompt = list(range(1000, 1512))
    alloc.allocate(0, prompt)  # registers the prompt's pages: later allocations can reuse them

    def allocate_free(reuse: bool) -> None:
        alloc.allocate(1, prompt, reuse=reuse)
        alloc.free(1)

    state = {"n": 0}
    alloc.allocate(2, [1])

    def append_one() -> None:  # the decode step's host work: one token, a new page every 16
        alloc.append(2, [state["n"] & 0xFFFF])
        state["n"] += 1
        if state["n"] % 2048 == 0:
            alloc.free(2)
            alloc.allocate(2, [1])

    return {"page allocator allocate+free 512 tokens": lambda: allocate_free(False),
            "page allocator allocate+free 512 tokens, prefix hit": lambda: allocate_free(True),
            "page allocator append 1 token": append_one}


def sampler_cases(vocab_size: int = 49152) -> dict[str, Case]:
    import jax
    import numpy as np

    from corejax.types.options import SamplingParams
    from corejax.engine.sampling import SamplingTensors, request_keys, sample

    logits = jax.device_put(np.random.default_rng(0).standard_normal((1, vocab_size)).astype(np.float32))
    jitted = jax.jit(sample)
    out: dict[str, Case] = {}
    for name, sp in (("greedy", SamplingParams(temperature=0.0)),
                     ("top-k 40 top-p 0.95", SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=1))):
        tensors, keys = SamplingTensors.from_params([sp], vocab_size), jax.device_put(request_keys([sp]))
        out[f"sampler device {name} V={vocab_size}"] = (
            lambda t=tensors, k=keys: jitted(logits, t, None, k, 0).tokens.block_until_ready())
    batch = [SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=i) for i in range(8)]
    out["sampler host tensors B=8"] = lambda: (SamplingTensors.from_params(batch, vocab_size), request_keys(batch))
    return out


def tokenizer_cases(tokenizer: Any) -> dict[str, Case]:
    from corejax.bench.text import corpus

    doc = corpus(1)[0]
    ids = tokenizer.encode(doc, add_special=False)

    def stream_decode() -> None:
        decoder = tokenizer.stream()
        for i in ids:
            decoder.push(i)
        decoder.flush()

    kb = len(doc.encode()) / 1024
    return {f"tokenizer encode {kb:.1f} KiB": lambda: tokenizer.encode(doc, add_special=False),
            f"tokenizer stream-decode {len(ids)} tokens": stream_decode}


def cases(tokenizer: Any | None = None) -> dict[str, Case]:
    out = {**codec_cases(), **allocator_cases(), **sampler_cases()}
    if tokenizer is not None:
        out.update(tokenizer_cases(tokenizer))
    return out


def steps(ctx: Any) -> int:
    return 1


def run(ctx: Any) -> None:
    from corejax import hub
    from corejax.bench.text import corejax_tokenizer

    tokenizer = corejax_tokenizer(hub.resolve(ctx.model, progress=False))
    ctx.describe("micro", "corejax", {"timer": "µs per call, one sample per calibrated batch"})
    for name, fn in cases(tokenizer).items():
        ctx.add("micro", name, "corejax", "us_per_call",
                time_per_call(fn, batches=ctx.reps + 2, min_batch_s=0.02 if ctx.quick else 0.1), "µs", "lower")
    ctx.step()
