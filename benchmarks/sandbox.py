"""What the sandbox costs: `python benchmarks/sandbox.py [--model NAME] [--tokens N] [--reps R]`.

1. protocol encode and decode, ns per message (a typical CHUNK, a RESULT with logprobs, an empty PING);
2. the round trip of an empty request (PING) through the worker loop, µs, sandboxed and in-process;
3. decode tokens/s on one model, sandboxed vs in-process, runs interleaved in one process so both see the same
   machine; both the worker's own decode rate and the rate the caller sees (wall clock, protocol included).
Prints a table and writes JSON (default benchmarks/out/sandbox.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import corejax
from corejax.results import Chunk, GenerationResult, Timings, TokenLogprob
from corejax.sandbox import protocol as p
from corejax.sandbox.protocol import Kind


def codec_ns(n: int) -> dict:
    lp = tuple(TokenLogprob(i, "tok", -0.5, ((i, -0.5), (i + 1, -1.0))) for i in range(32))
    messages = {
        "chunk": (Kind.CHUNK, p.chunk_to_wire(Chunk(" world", (1917,)))),
        "result": (Kind.RESULT, {"result": p.result_to_wire(GenerationResult(
            "x" * 200, tuple(range(32)), "length", tuple(range(64)), Timings(1, 64, 32, 0.1, 600, 50, 0.8), lp))}),
        "ping": (Kind.PING, {}),
    }
    out = {}
    for name, (kind, payload) in messages.items():
        frame = p.encode(kind, 7, payload)
        t = time.perf_counter_ns()
        for _ in range(n):
            p.encode(kind, 7, payload)
        enc = (time.perf_counter_ns() - t) / n
        t = time.perf_counter_ns()
        for _ in range(n):
            p.decode(frame)
        dec = (time.perf_counter_ns() - t) / n
        out[name] = {"bytes": len(frame), "encode_ns": round(enc), "decode_ns": round(dec)}
    return out


def round_trip_us(session: corejax.Session, n: int) -> float:
    for _ in range(50):
        session.ping()
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        session.ping()
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1000


def decode_run(session: corejax.Session, prompt: str, tokens: int) -> tuple[float, float]:
    """(the worker's decode tokens/s, tokens/s between the first and last chunk the caller received)."""
    stamps, result = [], None
    for chunk in session.stream_chunks(prompt, max_tokens=tokens, temperature=0, ignore_eos=True, logprobs=None):
        if chunk.result is not None:
            result = chunk.result
        else:
            stamps.append((time.perf_counter(), len(chunk.tokens)))
    seen = sum(k for _, k in stamps[1:])
    wall = stamps[-1][0] - stamps[0][0]
    return result.timings.decode_tokens_per_s, seen / wall if wall > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="registry name or path (default: the default model)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--codec-n", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "sandbox.json")
    args = ap.parse_args()

    report: dict = {"codec": codec_ns(args.codec_n)}
    for name, row in report["codec"].items():
        print(f"codec {name:7s} {row['bytes']:6d} B  encode {row['encode_ns']:7d} ns  decode {row['decode_ns']:7d} ns")

    sandboxed = corejax.Session(args.model, progress=False)
    in_process = corejax.Session(args.model, sandbox=False, progress=False)
    try:
        report["round_trip_us"] = {"sandboxed": round_trip_us(sandboxed, args.pings),
                                   "in_process": round_trip_us(in_process, args.pings)}
        print(f"empty request round trip: sandboxed {report['round_trip_us']['sandboxed']:.1f} µs, "
              f"in-process {report['round_trip_us']['in_process']:.1f} µs (median of {args.pings})")
        prompt = "The lighthouse keeper climbed the spiral stairs every evening at dusk, and"
        for s in (sandboxed, in_process):
            decode_run(s, prompt, args.tokens)  # compile these shapes
        runs: dict[str, list[tuple[float, float]]] = {"sandboxed": [], "in_process": []}
        for _ in range(args.reps):  # interleaved, so drift on a shared machine hits both alike
            runs["sandboxed"].append(decode_run(sandboxed, prompt, args.tokens))
            runs["in_process"].append(decode_run(in_process, prompt, args.tokens))
        med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
        report["decode_tokens_per_s"] = {k: {"worker": round(v[0], 2), "caller": round(v[1], 2)}
                                         for k, v in med.items()}
        report["sandboxed_over_in_process"] = {"worker": med["sandboxed"][0] / med["in_process"][0],
                                               "caller": med["sandboxed"][1] / med["in_process"][1]}
        report["sandbox_layers"] = {x["name"]: x["engaged"] for x in sandboxed.sandbox_report()["layers"]}
        report["model"] = sandboxed.info().get("name") or str(sandboxed.source.path)
    finally:
        sandboxed.close()
        in_process.close()
    d = report["decode_tokens_per_s"]
    r = report["sandboxed_over_in_process"]
    print(f"decode tok/s ({args.tokens} tokens, median of {args.reps}): sandboxed {d['sandboxed']['worker']:.1f} "
          f"(caller sees {d['sandboxed']['caller']:.1f}), in-process {d['in_process']['worker']:.1f} "
          f"(caller sees {d['in_process']['caller']:.1f}); ratio {r['worker']:.3f} (worker), {r['caller']:.3f} (caller)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
