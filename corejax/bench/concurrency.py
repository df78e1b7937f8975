"""Concurrency suite: aggregate generated tokens/s with 1, 2, 4 and 8 streams in flight on one sandboxed
corejax.Session, one thread per stream, measured through the public API only. Whatever the engine does
with concurrent requests (the scheduler batches them into shared decode steps) shows up here.

Each stream has its own prompt (a distinct first word, so no prefix is shared) and decodes a fixed number of
tokens; aggregate = all streams' generated tokens / wall time from the first submit to the last result.
Each level runs once unmeasured first, so new batch shapes compile outside the measurement.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from corejax.bench.text import PARAGRAPH

LEVELS = (1, 2, 4, 8, 16)


def burst(session: Any, streams: int, tokens: int, prompts: list[str] | None = None,
          arrivals: list[list[float]] | None = None) -> tuple[float, list[float]]:
    """(aggregate tokens/s, each stream's time to first token) with `streams` threads started together.
    prompts: one per stream (default "Story i: ..."); arrivals: if given, filled with each stream's
    perf_counter() at the submit and at every chunk that carried tokens (benchmarks/serving.py's latencies)."""
    start = threading.Barrier(streams + 1)
    if arrivals is not None:
        arrivals[:] = [[] for _ in range(streams)]
    ttft: list[float] = [0.0] * streams
    generated = [0] * streams
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            start.wait()
            t0 = time.perf_counter()
            if arrivals is not None:
                arrivals[i].append(t0)
            prompt = prompts[i] if prompts else f"Story {i}: {PARAGRAPH}"
            for chunk in session.stream_chunks(prompt, temperature=0, max_tokens=tokens, ignore_eos=True):
                if chunk.tokens:
                    now = time.perf_counter()
                    ttft[i] = ttft[i] or now - t0
                    if arrivals is not None:
                        arrivals[i].append(now)
                if chunk.result is not None:
                    generated[i] = chunk.result.timings.generated_tokens
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(generated) / wall, ttft


def steps(ctx: Any) -> int:
    return len(LEVELS) * (ctx.reps + 1)


def run(ctx: Any) -> None:
    import corejax

    tokens = ctx.decode_tokens
    with corejax.Session(ctx.model, progress=False, prefix_cache=False, keep_alive=0) as session:
        ctx.describe("concurrency", "corejax", {"sandbox": True, "streams": "threads on one Session"})
        base = None
        for n in LEVELS:
            burst(session, n, tokens)
            ctx.step()
            agg, first = [], []
            for _ in range(ctx.reps):
                rate, ttft = burst(session, n, tokens)
                agg.append(rate)
                first.append(sum(ttft) / n)
                ctx.step()
            case = f"streams={n}"
            ctx.add("concurrency", case, "corejax", "aggregate_tok_s", agg, "tok/s")
            ctx.add("concurrency", case, "corejax", "mean_ttft_s", first, "s", "lower")
            base = base or agg
            ctx.add("concurrency", case, "corejax", "speedup_vs_1_stream",
                    [a / (sum(base) / len(base)) for a in agg], "x")
