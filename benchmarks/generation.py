"""Prefill and decode tokens/s of corejax on the real models: `python benchmarks/generation.py [--models ...]`.

Prints a table and writes JSON (default benchmarks/out/generation.json). Each row is measured after a
warm-up run of the same shapes, so compile time is excluded; time to first token of the cold run is
reported separately. The peer comparison (llama.cpp, transformers) belongs to `corejax bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import corejax

PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil "
             "and a notebook in which he recorded the weather and the ships that passed. ")


def fingerprint() -> dict:
    import jax

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(), "corejax": corejax.__version__}


def prompt_of(session: corejax.Session, n_tokens: int) -> str:
    words = (PARAGRAPH * (n_tokens // 20 + 2)).split(" ")
    lo, hi = 1, len(words)
    while lo < hi:  # longest word prefix within n_tokens
        mid = (lo + hi + 1) // 2
        if len(session.tokenize(" ".join(words[:mid]))) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def measure(model: str, prompt_lengths: list[int], decode_tokens: int, reps: int) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    session = corejax.Session(model, progress=False)
    load_s = time.perf_counter() - t0
    for n in prompt_lengths:
        prompt = prompt_of(session, n)
        cold = session.generate(prompt, temperature=0, max_tokens=decode_tokens, ignore_eos=True)
        runs = [session.generate(prompt, temperature=0, max_tokens=decode_tokens, ignore_eos=True)
                for _ in range(reps)]
        prefill = [r.timings.prefill_tokens_per_s for r in runs]
        decode = [r.timings.decode_tokens_per_s for r in runs]
        rows.append({
            "model": model, "prompt_tokens": cold.timings.prompt_tokens, "decode_tokens": decode_tokens,
            "load_s": load_s, "cold_ttft_s": cold.timings.time_to_first_token_s,
            "ttft_s": statistics.median(r.timings.time_to_first_token_s for r in runs),
            "prefill_tok_s": statistics.median(prefill), "prefill_min": min(prefill), "prefill_max": max(prefill),
            "decode_tok_s": statistics.median(decode), "decode_min": min(decode), "decode_max": max(decode),
        })
    session.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--prompt-lengths", nargs="+", type=int, default=[32, 128, 512])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "generation.json"))
    args = ap.parse_args()
    rows = [r for m in args.models for r in measure(m, args.prompt_lengths, args.decode_tokens, args.reps)]
    print(f"{'model':<24}{'prompt':>7}{'prefill tok/s':>15}{'decode tok/s':>14}{'ttft s':>8}{'cold ttft s':>12}")
    for r in rows:
        print(f"{r['model']:<24}{r['prompt_tokens']:>7}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.1f}"
              f"{r['ttft_s']:>8.2f}{r['cold_ttft_s']:>12.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"fingerprint": fingerprint(), "command": "python benchmarks/generation.py",
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
