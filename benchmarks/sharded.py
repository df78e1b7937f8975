"""Tensor-parallel decode on forced host devices: what splitting a model over N devices costs or gains.

    python benchmarks/sharded.py [--models smollm2-135m-instruct gemma3-270m] [--devices 1 2 4]
                                 [--kv-cache-tokens 8192] [--decode-tokens 32]

Each (model, N) runs in a fresh subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4, so those
rows see the same 4 host devices and only `devices=N` changes. A multi-device process runs XLA's own ops
(the native kernels are single-device custom calls), so "1 xla" (one of the 4 devices) is the baseline for
the price of partitioning alone, and "1" (a plain one-device process, native kernels) the price a user pays.
On one CPU the host devices share the same cores, so N > 1 is not expected to be faster: this measures the
overhead, and catches regressions like whole-KV-pool copies per layer (engine.py, CACHE_WRITER_OPTIONS).
Writes benchmarks/out/sharded.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def child(model: str, devices: int, kv_cache_tokens: int, decode_tokens: int) -> dict:
    import jax

    import corejax

    session = corejax.Session(model, sandbox=False, progress=False, devices=devices, kv_cache_tokens=kv_cache_tokens)
    session.generate("Story one: " + PROMPT, temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    r = session.generate("Story two: " + PROMPT, temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    wall = time.perf_counter() - t0
    info = session.info()
    return {
        "model": model, "devices": devices, "devices_seen": jax.device_count(),
        "native_kernels": info["native_kernels"], "kv_cache_tokens": kv_cache_tokens,
        "prompt_tokens": r.timings.prompt_tokens, "prefill_tok_s": r.timings.prefill_tokens_per_s,
        "decode_tok_s": r.timings.decode_tokens_per_s, "wall_s": wall, "tokens": list(r.tokens),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--kv-cache-tokens", type=int, default=8192)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "DEVICES"), help=argparse.SUPPRESS)
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "sharded.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.kv_cache_tokens, args.decode_tokens)))
        return
    from corejax.bench.record import write_rows

    runs = [(n, True) for n in args.devices] + ([(1, False)] if 1 in args.devices else [])
    rows = []
    for model in args.models:
        for n, forced in runs:
            env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4" if forced else "")
            out = subprocess.run([sys.executable, __file__, "--child", model, str(n), "--kv-cache-tokens",
                                  str(args.kv_cache_tokens), "--decode-tokens", str(args.decode_tokens)],
                                 capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{model} devices={n}: failed\n{out.stderr[-2000:]}")
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'model':<24}{'devices':>9}{'prefill tok/s':>14}{'decode tok/s':>13}{'vs 1 xla':>9}{'vs 1':>7}"
          f"{'same tokens':>12}")
    for model in args.models:
        mine = [r for r in rows if r["model"] == model]
        one = next((r for r in mine if r["devices"] == 1 and r["native_kernels"]), None)
        one_xla = next((r for r in mine if r["devices"] == 1 and not r["native_kernels"]), one)
        for r in sorted(mine, key=lambda r: (r["devices"], not r["native_kernels"])):
            label = f"{r['devices']}{'' if r['native_kernels'] or r['devices'] > 1 else ' xla'}"
            vs = [f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}" if base else "-" for base in (one_xla, one)]
            same = "-" if one is None else "yes" if r["tokens"] == one["tokens"] else "NO"
            print(f"{model:<24}{label:>9}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>13.1f}{vs[0]:>9}{vs[1]:>7}"
                  f"{same:>12}")
    write_rows(args.json, "benchmarks/sharded.py", sys.argv[1:], rows)


if __name__ == "__main__":
    main()
