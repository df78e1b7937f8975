"""Long prompts through the paged cache: peak memory of a long prefill, and decode speed by context length.

    python benchmarks/long_context.py [--model smollm2-135m-instruct] [--contexts 256 2048 8000]
                                      [--kv-dtypes float32 int8]

Each (context, kv dtype) runs in a fresh subprocess so its peak RSS is its own. The dense-attention bound
printed beside it is what one [T, T] score matrix per head would take (T² · heads · 4 bytes): the paged
path never builds it. Writes benchmarks/out/long_context.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

FILLER = "The keeper logged the wind, the tide and every ship that passed the point that night. "


def child(model: str, context: int, kv_dtype: str, decode_tokens: int) -> dict:
    import corejax

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    session = corejax.Session(model, sandbox=False, progress=False, kv_dtype=kv_dtype)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ids_per_filler = len(session.tokenize(FILLER, add_special=False))
    prompt = FILLER * max(1, (context - 8) // ids_per_filler)
    # Warm-up on the same shapes (compiles), then a run with the prefix cache bypassed by a new first word.
    session.generate("Warm " + prompt, temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    r = session.generate("Cold " + prompt, temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    wall = time.perf_counter() - t0
    info = session.info()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "model": model, "kv_dtype": kv_dtype, "prompt_tokens": r.timings.prompt_tokens,
        "cached_prompt_tokens": r.timings.cached_prompt_tokens, "prefill_tok_s": r.timings.prefill_tokens_per_s,
        "decode_tok_s": r.timings.decode_tokens_per_s, "wall_s": wall, "python_rss": base, "rss_after_load": loaded,
        "peak_rss": peak, "weight_bytes": info["weight_bytes"], "kv_pool_bytes": info["kv_cache_bytes"],
        "dense_scores_bytes": r.timings.prompt_tokens ** 2 * info["config"]["num_heads"] * 4,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--contexts", nargs="+", type=int, default=[256, 2048, 8000])
    ap.add_argument("--kv-dtypes", nargs="+", default=["float32", "int8"])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "CONTEXT", "KV"), help=argparse.SUPPRESS)
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "long_context.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2], args.decode_tokens)))
        return
    from corejax.bench.record import write_rows

    rows = []
    for ctx in args.contexts:
        for kv in args.kv_dtypes:
            out = subprocess.run([sys.executable, __file__, "--child", args.model, str(ctx), kv,
                                  "--decode-tokens", str(args.decode_tokens)], capture_output=True, text=True)
            if out.returncode:
                print(f"{ctx} {kv}: failed\n{out.stderr[-2000:]}")
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mb = 1e6
    print(f"{'kv':<8}{'prompt':>7}{'prefill tok/s':>14}{'decode tok/s':>13}{'peak RSS MB':>12}"
          f"{'weights MB':>11}{'KV pool MB':>11}{'dense T²·N·4 MB':>16}")
    for r in rows:
        print(f"{r['kv_dtype']:<8}{r['prompt_tokens']:>7}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>13.1f}"
              f"{r['peak_rss'] / mb:>12.0f}{r['weight_bytes'] / mb:>11.0f}{r['kv_pool_bytes'] / mb:>11.0f}"
              f"{r['dense_scores_bytes'] / mb:>16.0f}")
    write_rows(args.json, "benchmarks/long_context.py", sys.argv[1:], rows)


if __name__ == "__main__":
    main()
