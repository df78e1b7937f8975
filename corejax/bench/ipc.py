"""IPC suite: what the sandbox protocol costs — the round trip of an empty request (PING) through the worker
loop, and decode tokens/s sandboxed vs in-process (runs interleaved, so drift on a shared machine hits both
alike), both the worker's own rate and the rate the caller sees between the first and last chunk. The
codec's per-message cost is in the micro suite."""

from __future__ import annotations

import statistics
import time
from typing import Any

from corejax.bench.text import PARAGRAPH

LABELS = {"corejax": True, "corejax (in-process)": False}  # label -> sandboxed


def round_trip_us(session: Any, n: int, batches: int) -> list[float]:
    """Median µs of an empty request, one sample per batch of n // batches requests, after 50 warm-up ones."""
    for _ in range(50):
        session.ping()
    out = []
    for _ in range(batches):
        times = []
        for _ in range(max(1, n // batches)):
            t = time.perf_counter_ns()
            session.ping()
            times.append(time.perf_counter_ns() - t)
        out.append(statistics.median(times) / 1000)
    return out


def decode_run(session: Any, prompt: str, tokens: int) -> tuple[float, float]:
    """(the worker's decode tokens/s, tokens/s between the first and last chunk the caller received)."""
    stamps, result = [], None
    for chunk in session.stream_chunks(prompt, max_tokens=tokens, temperature=0, ignore_eos=True):
        if chunk.result is not None:
            result = chunk.result
        else:
            stamps.append((time.perf_counter(), len(chunk.tokens)))
    seen = sum(k for _, k in stamps[1:])
    wall = stamps[-1][0] - stamps[0][0]
    return result.timings.decode_tokens_per_s, seen / wall if wall > 0 else 0.0


def steps(ctx: Any) -> int:
    return 2 + ctx.reps


def run(ctx: Any) -> None:
    import corejax

    pings = 500 if ctx.quick else 2000
    sessions = {label: corejax.Session(ctx.model, sandbox=sandboxed, progress=False, keep_alive=0)
                for label, sandboxed in LABELS.items()}
    try:
        for label, s in sessions.items():
            ctx.describe("ipc", label, {"sandbox": LABELS[label]})
            ctx.add("ipc", "empty request", label, "round_trip_us", round_trip_us(s, pings, 5), "µs", "lower")
            ctx.step()
        prompt = PARAGRAPH.strip()
        for s in sessions.values():
            decode_run(s, prompt, ctx.decode_tokens)  # compile these shapes
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label in sessions}
        for _ in range(ctx.reps):
            for label, s in sessions.items():
                runs[label].append(decode_run(s, prompt, ctx.decode_tokens))
            ctx.step()
        case = f"decode {ctx.decode_tokens} tokens"
        for label, r in runs.items():
            ctx.add("ipc", case, label, "worker_decode_tok_s", [w for w, _ in r], "tok/s")
            ctx.add("ipc", case, label, "caller_decode_tok_s", [c for _, c in r], "tok/s")
        sandboxed, in_process = runs["corejax"], runs["corejax (in-process)"]
        ctx.add("ipc", case, "corejax", "caller_sandboxed_over_in_process",
                [a[1] / b[1] for a, b in zip(sandboxed, in_process)], "ratio")
        layers = sessions["corejax"].sandbox_report()["layers"]
        ctx.describe("ipc", "corejax", {"sandbox": True, "layers": {x["name"]: x["engaged"] for x in layers}})
    finally:
        for s in sessions.values():
            s.close()
