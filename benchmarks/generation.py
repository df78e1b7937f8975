"""Prefill and decode tokens/s on the real models, corejax beside llama.cpp on the same GGUF file.

    python benchmarks/generation.py [--models ...] [--prompt-lengths 32 128 512] [--weights f32 native]

Prints a table and writes JSON (default benchmarks/out/generation.json). Each row is measured after a
warm-up run of the same shapes, so compile time is excluded; time to first token of the cold run is
reported separately. llama.cpp runs through llama-cpp-python when it is installed (same thread count as
this machine's cores; see --llama-build for how it was built), and is skipped with a line otherwise.
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


def measure(model: str, prompt_lengths: list[int], decode_tokens: int, reps: int, weights: str,
            sandbox: bool) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    # Prefix caching off: every run computes its whole prompt, so prefill is measured, not the cache.
    session = corejax.Session(model, progress=False, weights=weights, sandbox=sandbox, prefix_cache=False)
    load_s = time.perf_counter() - t0
    for n in prompt_lengths:
        prompt = prompt_of(session, n)
        cold = session.generate(prompt, temperature=0, max_tokens=decode_tokens, ignore_eos=True)
        runs = [session.generate(prompt, temperature=0, max_tokens=decode_tokens, ignore_eos=True)
                for _ in range(reps)]
        prefill = [r.timings.prefill_tokens_per_s for r in runs]
        decode = [r.timings.decode_tokens_per_s for r in runs]
        rows.append({
            "runtime": f"corejax ({weights}{', sandbox' if sandbox else ''})",
            "model": model, "prompt_tokens": cold.timings.prompt_tokens, "decode_tokens": decode_tokens,
            "load_s": load_s, "cold_ttft_s": cold.timings.time_to_first_token_s,
            "ttft_s": statistics.median(r.timings.time_to_first_token_s for r in runs),
            "prefill_tok_s": statistics.median(prefill), "prefill_min": min(prefill), "prefill_max": max(prefill),
            "decode_tok_s": statistics.median(decode), "decode_min": min(decode), "decode_max": max(decode),
        })
    session.close()
    return rows


def measure_llama_cpp(model: str, prompt_lengths: list[int], decode_tokens: int, reps: int,
                      build: str) -> list[dict]:
    """llama.cpp on the same file: prefill = one eval of the prompt; decode = greedy sample + eval per token."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp: skipped (pip install llama-cpp-python, see the README's benchmark notes)")
        return []
    from corejax import hub

    path = hub.resolve(model, progress=False).path
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=os.cpu_count(), n_batch=512, verbose=False)
    rows = []
    with corejax.Session(model, sandbox=False, progress=False) as session:
        prompts = {n: prompt_of(session, n) for n in prompt_lengths}
    for n, prompt in prompts.items():
        tokens = llm.tokenize(prompt.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true")
        prefill, decode = [], []
        for _ in range(reps + 1):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(tokens)
            t1 = time.perf_counter()
            for _ in range(decode_tokens):
                llm.eval([llm.sample(temp=0.0)])
            t2 = time.perf_counter()
            prefill.append(len(tokens) / (t1 - t0))
            decode.append(decode_tokens / (t2 - t1))
        prefill, decode = prefill[1:], decode[1:]  # the first run warms up
        rows.append({
            "runtime": f"llama.cpp ({build})", "model": model, "prompt_tokens": len(tokens),
            "decode_tokens": decode_tokens, "load_s": None, "cold_ttft_s": None, "ttft_s": None,
            "prefill_tok_s": statistics.median(prefill), "prefill_min": min(prefill), "prefill_max": max(prefill),
            "decode_tok_s": statistics.median(decode), "decode_min": min(decode), "decode_max": max(decode),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--prompt-lengths", nargs="+", type=int, default=[32, 128, 512])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--weights", nargs="+", default=["f32"], choices=["f32", "native", "int8", "int4"])
    ap.add_argument("--no-sandbox", dest="sandbox", action="store_false")
    ap.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    ap.add_argument("--llama-build", default="llama-cpp-python 0.3.36, GGML_NATIVE=OFF AVX2/AVX512/VNNI, no AMX")
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "generation.json"))
    args = ap.parse_args()
    rows = []
    for m in args.models:
        for w in args.weights:
            rows += measure(m, args.prompt_lengths, args.decode_tokens, args.reps, w, args.sandbox)
        if args.llama_cpp:
            rows += measure_llama_cpp(m, args.prompt_lengths, args.decode_tokens, args.reps, args.llama_build)
    print(f"{'runtime':<34}{'model':<24}{'prompt':>7}{'prefill tok/s':>15}{'decode tok/s':>14}{'ttft s':>8}")
    for r in rows:
        ttft = "-" if r["ttft_s"] is None else f"{r['ttft_s']:.2f}"
        print(f"{r['runtime']:<34}{r['model']:<24}{r['prompt_tokens']:>7}{r['prefill_tok_s']:>15.1f}"
              f"{r['decode_tok_s']:>14.1f}{ttft:>8}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"fingerprint": fingerprint(), "command": "python benchmarks/generation.py",
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
