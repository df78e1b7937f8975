"""Where a decode step's time goes, by batch size: XLA's profiler trace of the real decode program (the ModelRunner's,
as the scheduler calls it) at 1, 2, 4, 8 and 16 rows, each op's time per step, grouped by kernel and shape.

    python benchmarks/step_profile.py [--model smollm2-135m-instruct] [--context 150] [--rows 1 2 4 8 16]

Each row of the table is one kind of call (a quantized matmul of one output width, the paged attention, the LM
head, XLA's own fusions together); columns are batch sizes, in ms per step; the last rows are the whole step
(wall, from dispatch to the tokens on the host) and its rate. Writes benchmarks/out/step_profile.json.
The model is the registry's, pulled once like any other (no download when it is cached).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _runner(model: str):
    from corejax.hub import resolve
    from corejax.worker.start import open_runtime

    return open_runtime(resolve(model), progress=False).runner


def _batch(runner, rows: int, context: int):
    from corejax.engine.sampling import SamplingBatch
    from corejax.serving.batch import StepBatch
    from corejax.types.options import SamplingParams

    pages = -(-(context + 1) // runner.engine_cfg.page_size)
    table = np.zeros((rows, runner.table_pages), np.int32)
    for i in range(rows):  # each row its own pages, as distinct streams have
        table[i, :pages] = 1 + i * pages + np.arange(pages)
    batch = StepBatch(np.ones((rows, 1), np.int32), np.full((rows, 1), context, np.int32),
                      np.full((rows,), context + 1, np.int32), np.zeros((rows,), np.int32), table, rows)
    sampling = SamplingBatch.build([SamplingParams(temperature=0.0, ignore_eos=True)] * rows, [], [((), ())] * rows,
                                   rows, runner.cfg.vocab_size)
    return batch, sampling, np.zeros((rows,), np.int32)


def _labels(runner, batch, sampling, steps) -> dict[str, str]:
    """HLO instruction name -> what it is ("quant_matmul -> [B, 1536]", "paged_attention", ...)."""
    args = (runner.params, batch.tokens, batch.positions, batch.cache(runner.cache), sampling.tensors,
            sampling.penalties, sampling.keys, steps)
    text = runner.programs.decode_step.lower(*args, cfg=runner.cfg, kernels=runner.kernels,
                                             mask=None).compile().as_text()
    labels = {}
    for line in text.splitlines():
        m = re.search(r"%(\S+) = \w+\[([\d,]*)\].*custom_call_target=\"corejax_(\w+)\"", line)
        if not m:
            continue
        name, dims, target = m.groups()
        if "attention" in target:
            labels[name] = "paged_attention"
            continue
        k = re.search(r"operand_layout_constraints=\{f32\[\d+,(\d+)\]", line)
        labels[name] = f"{target} [B, {k.group(1) if k else '?'}] -> [B, {dims.split(',')[-1]}]"
    return labels


def profile(runner, rows: int, context: int, reps: int) -> dict[str, float]:
    import jax

    args = _batch(runner, rows, context)
    labels = _labels(runner, *args)
    for _ in range(3):
        np.asarray(runner.decode(*args).tokens)
    wall = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.asarray(runner.decode(*args).tokens)
        wall.append(time.perf_counter() - t0)
    folder = Path(tempfile.mkdtemp(prefix="corejax-trace-"))
    try:
        with jax.profiler.trace(str(folder), create_perfetto_trace=True):
            for _ in range(reps):
                np.asarray(runner.decode(*args).tokens)
        trace = json.load(gzip.open(glob.glob(str(folder / "**" / "*.trace.json.gz"), recursive=True)[0]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ms: dict[str, float] = collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") != "X" or e["name"].startswith(("$", "Thunk", "Pjit", "Common")):
            continue
        name = e["name"]
        if name in labels:
            ms[labels[name]] += e["dur"] / 1e3 / reps
        elif name.startswith("while"):
            ms["layer loop (all ops in it)"] += e["dur"] / 1e3 / reps
        elif "fusion" in name or name.startswith(("wrapped_", "copy", "broadcast", "scatter", "gather")):
            ms["XLA ops (fusions, scatters)"] += e["dur"] / 1e3 / reps
    wall.sort()
    ms["step, wall (dispatch to tokens)"] = wall[len(wall) // 2] * 1e3
    ms["tokens/s"] = rows / (wall[len(wall) // 2])
    return dict(ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--context", type=int, default=150, help="tokens already in each row's cache")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "step_profile.json"))
    args = ap.parse_args()

    from corejax.bench.machine import fingerprint

    runner = _runner(args.model)
    table = {b: profile(runner, b, args.context, args.reps) for b in args.rows}
    keys = sorted({k for t in table.values() for k in t},
                  key=lambda k: (k.startswith(("step", "tokens")), -max(t.get(k, 0) for t in table.values())))
    print(f"{args.model}, decode step at {args.context} tokens of context, ms per step by rows")
    print(f"{'':<40}" + "".join(f"{b:>9}" for b in args.rows))
    for k in keys:
        print(f"{k:<40}" + "".join(f"{table[b].get(k, 0):9.2f}" if k != "tokens/s" else f"{table[b][k]:9.0f}"
                                   for b in args.rows))
    record = {"fingerprint": fingerprint(), "model": args.model, "context": args.context, "ms_per_step": table}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
