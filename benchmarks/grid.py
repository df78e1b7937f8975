"""Real sizes and real contexts, corejax beside llama.cpp on the same GGUF, in one command.

    python benchmarks/grid.py [--models smollm2 gemma3 1.1b 3b 8b] [--prompts 128 1024 4096 16384]
                              [--decode-tokens 32] [--reps 1]

For each model, `corejax bench --suite generation --runtimes corejax llama.cpp` on its file with the prompt
lengths that fit its context: prefill tok/s, decode tok/s at that context, load, cold time to first token,
peak RSS, each runtime in its own process, alternated per prompt. smollm2 and gemma3 are the registry's real
files; 1.1b, 3b and 8b are random-weight GGUFs of TinyLlama-1.1B, Llama-3.2-3B and Llama-3.1-8B shapes made
and cached by benchmarks/shapes.py. Prints one table (corejax / llama.cpp per cell), writes
benchmarks/out/grid.json and benchmarks/out/grid.png (tok/s against context length). Run it on an idle machine:
the full grid takes hours on 2 cores (an 8B 16k-token prefill alone is minutes per runtime).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
REGISTRY = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}
METRICS = ("prefill_tok_s", "decode_tok_s")
START = ("load_s", "ttft_cold_s", "peak_rss_mb")


def model_file(name: str) -> Path:
    if name in REGISTRY:
        from corejax import hub

        return hub.resolve(REGISTRY[name], progress=True).path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import shapes

    return shapes.build(name)


def context_of(path: Path) -> int:
    from corejax.loading.gguf import read_gguf

    with read_gguf(path) as f:
        arch = f.metadata["general.architecture"]
        return int(f.metadata[f"{arch}.context_length"])


def run_model(name: str, prompts: list[int], args: argparse.Namespace) -> dict:
    path = model_file(name)
    fits = [p for p in prompts if p + args.decode_tokens + 8 <= context_of(path)]
    if not fits:
        return {"model": name, "file": str(path), "error": f"no prompt length fits its context ({context_of(path)})"}
    record = OUT / f"grid-{name}.json"
    cmd = [sys.executable, "-m", "corejax.cli", "bench", "--suite", "generation", "--runtimes", "corejax", "llama.cpp",
           "-m", str(path), "--prompt-lengths", *map(str, fits), "--reps", str(args.reps), "--decode-tokens",
           str(args.decode_tokens), "--peer-timeout", str(args.peer_timeout), "--json", str(record), "--no-progress"]
    t0 = time.perf_counter()
    if not (args.reuse and record.exists()):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode or not record.exists():
            print(f"{name}: the bench failed ({done.returncode})\n{done.stderr[-3000:]}", file=sys.stderr)
            return {"model": name, "file": str(path), "error": done.stderr[-3000:]}
    rows = json.loads(record.read_text())["results"]
    cells: dict = {}
    for r in rows:
        if r["suite"] == "generation" and r["runtime"] in ("corejax", "llama.cpp"):
            cells.setdefault(r["case"], {}).setdefault(r["metric"], {})[r["runtime"]] = r["median"]
    # The bench names a case by the prompt's real token count (a tokenizer can land one short of the target).
    measured = sorted(int(c.split("=", 1)[1]) for c in cells if c.startswith("prompt="))
    return {"model": name, "file": str(path), "prompts": measured, "cells": cells,
            "wall_s": time.perf_counter() - t0}


def _cell(values: dict | None) -> str:
    if not values or "corejax" not in values or "llama.cpp" not in values:
        return "-"
    a, b = values["corejax"], values["llama.cpp"]
    fmt = (lambda x: f"{x:.0f}") if max(a, b) >= 100 else (lambda x: f"{x:.3g}")
    return f"{fmt(a)} / {fmt(b)} ({a / b:.2f}x)" if b else f"{fmt(a)} / {fmt(b)}"


def print_table(results: list[dict]) -> None:
    print("corejax / llama.cpp (ratio); tok/s, seconds, MB")
    head = f"{'model':<9}{'prompt':>7}  {'prefill tok/s':<26}{'decode tok/s':<26}"
    print(head)
    for res in results:
        for p in res.get("prompts", []):
            c = res["cells"].get(f"prompt={p}", {})
            print(f"{res['model']:<9}{p:>7}  {_cell(c.get('prefill_tok_s')):<26}{_cell(c.get('decode_tok_s')):<26}")
    print(f"\n{'model':<9}  {'load s':<26}{'cold TTFT s':<26}{'peak RSS MB':<26}")
    for res in results:
        if "cells" not in res:
            print(f"{res['model']:<9}  failed")
            continue
        c = {**res["cells"].get("start", {}), **res["cells"].get("memory", {})}
        print(f"{res['model']:<9}  " + "".join(f"{_cell(c.get(m)):<26}" for m in START))


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, METRICS, strict=True):
        for res in results:
            xs = res.get("prompts", [])
            for runtime, style in (("corejax", "-o"), ("llama.cpp", "--x")):
                ys = [res["cells"].get(f"prompt={p}", {}).get(metric, {}).get(runtime) for p in xs]
                pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=f"{res['model']} {runtime}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel(metric.replace("_tok_s", " tok/s"))
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3", "1.1b", "3b", "8b"])
    ap.add_argument("--prompts", nargs="+", type=int, default=[128, 1024, 4096, 16384])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--peer-timeout", type=float, default=1800)
    ap.add_argument("--json", default=str(OUT / "grid.json"))
    ap.add_argument("--reuse", action="store_true", help="read each model's record from an earlier run "
                    "(benchmarks/out/grid-<model>.json) instead of measuring again")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results = [run_model(m, args.prompts, args) for m in args.models]
    print_table(results)
    Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1))
    plot(results, Path(args.json).with_suffix(".png"))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
