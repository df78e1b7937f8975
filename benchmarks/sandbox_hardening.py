"""What the sandbox hardening of issue 17 costs, side by side with the code before it, in one run: a sandboxed
Session's second cold start (constructor to the first token, with the model's compiled programs already
cached) and its steady decode tokens/s (after a short warm-up request), each measured in a fresh process, the
two code trees alternating.

    python benchmarks/sandbox_hardening.py [--before e4eca01] [--model smollm2-135m-instruct] [--reps 5]

"before" is a git revision of this repository (checked out into a temporary worktree); "after" is the working
tree. Prints a table (median [min-max] and after/before) and writes benchmarks/out/sandbox_hardening.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import corejax
s = corejax.Session(sys.argv[1], progress=False)
first = s.generate("Once upon a time", max_tokens=1, temperature=0)
cold = time.perf_counter() - t0
s.generate("Once upon a time", max_tokens=8, temperature=0, ignore_eos=True)  # decode programs loaded
r = s.generate("Once upon a time", max_tokens=int(sys.argv[2]), temperature=0, ignore_eos=True)
layers = [l["name"] for l in s.sandbox_report()["layers"] if l["engaged"]]
s.close()
print(json.dumps({"cold_start_s": cold, "decode_tok_s": r.timings.decode_tokens_per_s, "layers": layers}))
"""


def _measure(tree: Path, model: str, tokens: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(tokens)], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="e4eca01", help="git revision with the previous sandbox")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "sandbox_hardening.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="corejax-before-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                       check=True, capture_output=True)
        # corejax.kernels is the top-level kernels/ folder (pyproject's package-dir), which an editable install
        # maps to *this* checkout: a link makes the old tree import its own.
        (before / "corejax" / "kernels").symlink_to("../kernels")
        try:
            trees = {"before": before, "after": ROOT}
            runs: dict[str, list[dict]] = {name: [] for name in trees}
            for name, tree in trees.items():  # warm-up: compiles and fills each tree's program cache
                _measure(tree, args.model, args.decode_tokens)
            for _ in range(args.reps):
                for name, tree in trees.items():
                    runs[name].append(_measure(tree, args.model, args.decode_tokens))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False,
                           capture_output=True)
    rows = {}
    print(f"{'metric':<16} {'before':>26} {'after':>26} {'after/before':>13}")
    for metric in ("cold_start_s", "decode_tok_s"):
        stats = {}
        for name in runs:
            vals = [r[metric] for r in runs[name]]
            stats[name] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}
        ratio = stats["after"]["median"] / stats["before"]["median"]
        rows[metric] = {**stats, "after_over_before": ratio}
        cell = lambda s: f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"  # noqa: E731
        print(f"{metric:<16} {cell(stats['before']):>26} {cell(stats['after']):>26} {ratio:>12.3f}x")
    record = {"model": args.model, "before": args.before, "reps": args.reps, "decode_tokens": args.decode_tokens,
              "cpu_flags": next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo")
                                 if line.startswith("flags")), []),
              "layers_after": runs["after"][-1]["layers"], "results": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
