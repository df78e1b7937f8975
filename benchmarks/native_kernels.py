"""The native CPU kernels against XLA's own ops, side by side in one run (median ms of repeated calls):

1. a 30-layer SmolLM2-shaped MLP stack ([576, 1536] x 2 and [1536, 576] per layer, 318 MB of float32) for
   1-32 rows: XLA's dot on [K, N] weights vs kernels/small_matmul.cc on column-blocked weights;
2. one SmolLM2 decode step (Engine.programs.decode_step) for batches of 1 and 8 rows at 100 and 500 tokens of
   context, with the native kernels and with COREJAX_NATIVE=0 (each in a fresh process).

    python benchmarks/native_kernels.py [--reps 9]

Prints a table and writes benchmarks/out/native_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _median_ms(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def mlp_stack(reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from corejax.kernels import ffi
    from corejax.kernels.small_matmul import blocked_matmul, to_blocked

    if not ffi.ensure():
        return {"skipped": "the native kernels could not be built"}
    rng = np.random.default_rng(0)
    shapes = ((576, 1536), (576, 1536), (1536, 576))
    weights = [[rng.standard_normal(s, np.float32) * 0.02 for s in shapes] for _ in range(30)]
    variants = {"xla": (lambda x, w: x @ w, [[jnp.asarray(w) for w in layer] for layer in weights]),
                "native": (blocked_matmul, [[to_blocked(w) for w in layer] for layer in weights])}
    out = {}
    for name, (mm, ws) in variants.items():
        def stack(x, ws, mm=mm):
            for g, u, d in ws:
                x = x + mm(jax.nn.silu(mm(x, g)) * mm(x, u), d)
            return x
        f = jax.jit(stack)
        for rows in (1, 2, 4, 8, 16, 32, 128, 512):
            x = jnp.asarray(rng.standard_normal((rows, 576), np.float32))
            out[f"{name} rows={rows}"] = _median_ms(lambda f=f, x=x, ws=ws: f(x, ws).block_until_ready(), reps)
    return out


def decode_steps(reps: int) -> dict:
    import numpy as np

    from corejax.types.options import SamplingParams
    from corejax.hub import resolve
    from corejax.worker.start import open_runtime
    from corejax.engine.sampling import SamplingTensors

    eng = open_runtime(resolve("smollm2-135m-instruct"), progress=False).engine
    out = {}
    for b, length, width in ((1, 100, 16), (8, 100, 16), (1, 500, 64), (8, 500, 64)):
        sampling = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * b, eng.cfg.vocab_size)
        tokens = np.ones((b, 1), np.int32)
        positions = np.full((b, 1), length, np.int32)
        table = (np.arange(b * width, dtype=np.int32).reshape(b, width) % (eng.allocator.num_pages - 1)) + 1
        lengths = np.full((b,), length + 1, np.int32)
        keys, steps = np.zeros((b, 2), np.uint32), np.zeros((b,), np.int32)

        def once(args=(tokens, positions, table, lengths, sampling, keys, steps)):
            tokens, positions, table, lengths, sampling, keys, steps = args
            result, eng.cache, _ = eng.programs.decode_step(eng.params, tokens, positions,
                                                            eng.cache.with_rows(table, lengths), sampling, None,
                                                            keys, steps, cfg=eng.cfg)
            np.asarray(result.tokens)
        out[f"B={b} context={length}"] = _median_ms(once, reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--part", choices=["mlp", "decode"], help=argparse.SUPPRESS)  # one part, in this process
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "native_kernels.json"))
    args = ap.parse_args()
    if args.part:
        print(json.dumps(mlp_stack(args.reps) if args.part == "mlp" else decode_steps(args.reps)))
        return

    def child(part: str, native: bool) -> dict:
        env = dict(os.environ, COREJAX_NATIVE="1" if native else "0")
        proc = subprocess.run([sys.executable, __file__, "--part", part, "--reps", str(args.reps)], env=env,
                              capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    from corejax.bench.machine import fingerprint

    record = {"fingerprint": fingerprint(), "mlp_stack_ms": child("mlp", True),
              "decode_step_ms": {"native": child("decode", True), "xla": child("decode", False)}}
    print("30-layer MLP stack, ms per call")
    for key, ms in record["mlp_stack_ms"].items():
        print(f"  {key:<18} {ms:8.1f}" if isinstance(ms, float) else f"  {key}: {ms}")
    print("SmolLM2 decode step, ms        native      xla   xla/native")
    for key, ms in record["decode_step_ms"]["native"].items():
        xla = record["decode_step_ms"]["xla"][key]
        print(f"  {key:<24} {ms:8.1f} {xla:8.1f} {xla / ms:8.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
