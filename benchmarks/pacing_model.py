"""The scheduler's prefill pacing on a cost model: bursts of streams, the step loop replayed without a model.

    python benchmarks/pacing_model.py [--prefill-ms 20 0.9] [--decode-ms 10 2] [--stagger-ms 5]

A step is corejax/serving/scheduler.py's: one prefill call (batch.prefill_parts over the budget a policy
gives), then one decode call for every running stream. A prefill call costs a + b * padded tokens (B * T) ms,
a decode step c + d * B ms (B bucketed); the defaults are SmolLM2-135M Q4_1 on 2 idle Sapphire Rapids cores,
which reproduce the serving benchmark's recorded inter-token P95 at main 6704877 (149 ms at 8 streams, 171 ms
at 16; this model: 153, 177). Each burst's requests arrive --stagger-ms apart (the HTTP server's are a few ms
apart). Policies: fixed token budgets while decoding (main's 128; 32 as in stall-free batching), and
PrefillPacer with the call times of the model. Prints aggregate tok/s, TTFT P50/P95, inter-token P95/max.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from corejax.serving.batch import bucket, prefill_parts
from corejax.serving.pacing import PrefillPacer


class Fixed:
    def __init__(self, chunk: int, tokens: int):
        self.chunk, self.tokens = chunk, tokens

    def budget(self, decoding: bool) -> int:
        return self.tokens if decoding else self.chunk

    def timed(self, shape: tuple[int, int], seconds: float) -> None:
        pass


def burst(policy, n: int, args, prompt: int = 128, tokens: int = 64, chunk: int = 512, max_batch: int = 16):
    arrivals = [args.stagger_ms * i for i in range(n)]
    t, waiting, prefilling, running = 0.0, list(range(n)), [], []
    computed, out = {}, {i: [] for i in range(n)}
    while waiting or prefilling or running:
        while waiting and arrivals[waiting[0]] <= t and len(prefilling) + len(running) < max_batch:
            computed[waiting[0]] = 0
            prefilling.append(waiting.pop(0))
        if not prefilling and not running:
            t = arrivals[waiting[0]]
            continue
        if prefilling:
            parts = prefill_parts(((range(prompt), computed[i]) for i in prefilling), policy.budget(bool(running)),
                                  max_batch)
            shape = (bucket(len(parts), 1), bucket(max(len(p) for p, _ in parts), 16))
            cost = args.prefill_ms[0] + args.prefill_ms[1] * shape[0] * shape[1]
            t += cost
            policy.timed(shape, cost / 1e3)
            for i, (part, final) in zip(list(prefilling), parts):
                computed[i] += len(part)
                if final:
                    prefilling.remove(i)
                    running.append(i)
                    out[i].append(t)
        if running:
            t += args.decode_ms[0] + args.decode_ms[1] * bucket(len(running), 1)
            for i in list(running):
                out[i].append(t)
                if len(out[i]) >= tokens:
                    running.remove(i)
    gaps = [b - a for times in out.values() for a, b in itertools.pairwise(times)]
    ttft = [out[i][0] - arrivals[i] for i in out]

    def pct(v, q):
        return statistics.quantiles(v, n=100, method="inclusive")[q - 1] if len(v) > 1 else v[0]

    return n * tokens / max(o[-1] for o in out.values()) * 1e3, pct(ttft, 50), pct(ttft, 95), pct(gaps, 95), max(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill-ms", nargs=2, type=float, default=[20.0, 0.9], metavar=("FIXED", "PER_TOKEN"))
    ap.add_argument("--decode-ms", nargs=2, type=float, default=[10.0, 2.0], metavar=("FIXED", "PER_ROW"))
    ap.add_argument("--stagger-ms", type=float, default=5.0)
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    args = ap.parse_args()
    policies = {"128 while decoding (main)": lambda: Fixed(512, 128), "32 while decoding": lambda: Fixed(512, 32),
                "PrefillPacer 1.0 s": lambda: PrefillPacer(512, 1.0), "PrefillPacer 0.25 s": lambda: PrefillPacer(512, 0.25),
                "PrefillPacer 0.05 s": lambda: PrefillPacer(512, 0.05)}
    print(f"{'streams':>7} {'policy':<26} {'agg tok/s':>9} {'TTFT p50':>9} {'p95':>7} {'ITL p95':>8} {'max':>6}  (ms)")
    for n in args.streams:
        for name, make in policies.items():
            pacer = make()
            burst(pacer, n, args)  # the pacer's first calls of each shape are compiles, not timings
            agg, t50, t95, i95, imax = burst(pacer, n, args)
            print(f"{n:>7} {name:<26} {agg:9.1f} {t50:9.0f} {t95:7.0f} {i95:8.1f} {imax:6.0f}")


if __name__ == "__main__":
    main()
