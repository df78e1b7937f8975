"""Structured output: what a JSON schema costs per decoded token, and the grammar engines side by side.

    python benchmarks/structured.py [--models smollm2-135m-instruct gemma3-270m] [--repeats 3]
                                    [--parts decode engines llama]

decode   corejax, one stream, greedy: a schema-constrained request, then the same prompt unconstrained for the
         same number of tokens (ignore_eos), alternated `--repeats` times after a warm-up of both; the ratio of
         decode tokens/s (target >= 0.9) and the host time spent on masks per token.
engines  teacher-forced mask computation over a conforming JSON text tokenized by our tokenizers: llguidance
         (the engine corejax uses) and xgrammar when it is importable; grammar compile time, per-step mask time
         (median / p95), and whether every forced token was allowed.
llama    the same schema through llama.cpp (llama-cpp-python's `response_format` with a schema, which it turns
         into a GBNF grammar) beside its own unconstrained decode, when llama_cpp is importable.

Prints a table; writes benchmarks/out/structured.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ITEM = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 16},
    "tags": {"type": "array", "items": {"enum": ["friend", "colleague", "family"]}, "maxItems": 2}},
    "required": ["name", "age", "city", "tags"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": ITEM, "minItems": 6, "maxItems": 6}},
          "required": ["people"], "additionalProperties": False}
PROMPT = "Write a JSON object listing six people, each with a name, age, city and tags.\nJSON:"
FORCED = json.dumps({"people": [{"name": f"Person {i}", "age": 20 + i, "city": "Lyon", "tags": ["friend"]}
                                for i in range(6)]}, indent=2)


def decode_part(model: str, repeats: int) -> dict:
    import corejax

    s = corejax.Session(model, sandbox=False, progress=False)
    fmt = {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}}
    constrained = lambda: s.generate(PROMPT, temperature=0, max_tokens=400, response_format=fmt)  # noqa: E731
    first = constrained()
    n = first.timings.generated_tokens
    free = lambda: s.generate(PROMPT, temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    free()
    runs = {"constrained": [], "free": [], "mask_ms_per_token": []}
    for _ in range(repeats):
        c = constrained()
        runs["constrained"].append(c.timings.decode_tokens_per_s)
        runs["mask_ms_per_token"].append(c.timings.mask_s / c.timings.generated_tokens * 1e3)
        runs["free"].append(free().timings.decode_tokens_per_s)
    json.loads(first.text)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"model": model, "tokens": n, "finish_reason": first.finish_reason,
            "constrained_tok_s": med["constrained"], "free_tok_s": med["free"],
            "ratio": med["constrained"] / med["free"], "mask_ms_per_token": med["mask_ms_per_token"], "runs": runs}


def _tokenizer(model: str):
    from corejax import hub
    from corejax.loading.gguf import read_gguf
    from corejax.tokenizer.gguf import tokenizer_from_gguf_metadata

    with read_gguf(hub.resolve(model, progress=False).path) as f:
        return tokenizer_from_gguf_metadata(f.metadata)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _summary(engine: str, model: str, compile_s: float, steps: list[float], ok: bool) -> dict:
    steps = sorted(steps)
    return {"engine": engine, "model": model, "compile_ms": compile_s * 1e3, "steps": len(steps),
            "mask_us_median": statistics.median(steps) * 1e6, "mask_us_p95": steps[int(0.95 * (len(steps) - 1))] * 1e6,
            "all_forced_tokens_allowed": ok}


def engines_part(model: str) -> list[dict]:
    import numpy as np

    from corejax.serving.structured import GrammarVocab, mask_words
    from corejax.types.constraints import Constraint

    tok = _tokenizer(model)
    ids = tok.encode(FORCED, add_special=False)
    constraint = Constraint.from_options(response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    rows = []
    vocab = GrammarVocab(tok, tok.vocab_size)
    masks = np.zeros((1, mask_words(tok.vocab_size)), np.int32)
    matcher = None

    def build():
        nonlocal matcher
        matcher = vocab.matcher(constraint)

    compile_s = _timed(build)
    steps, ok = [], True
    for t in ids:
        steps.append(_timed(lambda: vocab.fill([(matcher, 0, [])], masks)))
        ok &= bool(masks[0, t // 32] >> (t % 32) & 1)
        matcher.consume(t)
    rows.append(_summary("llguidance", model, compile_s, steps, ok))
    try:
        import xgrammar as xgr
    except ImportError as e:
        print(f"xgrammar: skipped ({e})", file=sys.stderr)
        return rows
    info = xgr.TokenizerInfo([tok.token_bytes(i) for i in range(tok.vocab_size)], xgr.VocabType.RAW,
                             vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.eos_ids))
    compiler = xgr.GrammarCompiler(info)
    compiled = None

    def build_x():
        nonlocal compiled
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True)  # as corejax: free whitespace

    compile_s = _timed(build_x)
    m = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    steps, ok = [], True
    for t in ids:
        steps.append(_timed(lambda: m.fill_next_token_bitmask(bitmask)))
        ok &= bool(int(bitmask[0, t // 32]) >> (t % 32) & 1)
        ok &= m.accept_token(t)
    rows.append(_summary("xgrammar", model, compile_s, steps, ok))
    return rows


def llama_part(model: str, repeats: int) -> dict | None:
    try:
        import llama_cpp
    except ImportError as e:
        print(f"llama.cpp: skipped ({e})", file=sys.stderr)
        return None
    from corejax import hub

    llm = llama_cpp.Llama(str(hub.resolve(model, progress=False).path), n_ctx=2048, n_threads=2, verbose=False)

    def run(**kw):
        t = time.perf_counter()
        out = llm.create_completion(PROMPT, temperature=0, **kw)
        return out, time.perf_counter() - t

    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    first, _ = run(max_tokens=400, grammar=grammar)
    n = first["usage"]["completion_tokens"]
    run(max_tokens=n)
    constrained, free = [], []
    for _ in range(repeats):  # tokens/s over the whole call (prompt is cached after the first run)
        out, s = run(max_tokens=400, grammar=grammar)
        constrained.append(out["usage"]["completion_tokens"] / s)
        out, s = run(max_tokens=n)
        free.append(out["usage"]["completion_tokens"] / s)
    c, f = statistics.median(constrained), statistics.median(free)
    return {"model": model, "tokens": n, "constrained_tok_s": c, "free_tok_s": f, "ratio": c / f,
            "valid_json": _parses(first["choices"][0]["text"])}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _decode_table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    print(f"\n{title:<24}{'tokens':>7}{'schema tok/s':>13}{'free tok/s':>11}{'ratio':>7}{'mask ms/tok':>12}")
    for r in rows:
        mask = f"{r['mask_ms_per_token']:>12.3f}" if "mask_ms_per_token" in r else ""
        print(f"{r['model']:<24}{r['tokens']:>7}{r['constrained_tok_s']:>13.1f}{r['free_tok_s']:>11.1f}"
              f"{r['ratio']:>7.2f}{mask}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", nargs="+", default=["decode", "engines", "llama"], choices=["decode", "engines", "llama"])
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "structured.json"))
    args = ap.parse_args()
    from corejax.bench.machine import fingerprint
    from corejax.kernels import ffi

    ffi.ensure()  # the native kernels, as a Session loads them: their ISA is the one the figures ran on
    record = {"command": "python benchmarks/structured.py " + " ".join(sys.argv[1:]), "isa": ffi.isa(),
              "machine": fingerprint(), "decode": [], "engines": [], "llama": []}
    for model in args.models:
        if "decode" in args.parts:
            record["decode"].append(decode_part(model, args.repeats))
        if "engines" in args.parts:
            record["engines"].extend(engines_part(model))
        if "llama" in args.parts:
            row = llama_part(model, args.repeats)
            if row is not None:
                record["llama"].append(row)
    print(f"ISA: {record['isa']}")
    _decode_table("corejax decode", record["decode"])
    if record["engines"]:
        print(f"\n{'engine':<12}{'vocabulary':<24}{'compile ms':>11}{'steps':>6}{'mask us p50':>12}{'p95':>8}"
              f"{'forced ok':>10}")
        for r in record["engines"]:
            print(f"{r['engine']:<12}{r['model']:<24}{r['compile_ms']:>11.1f}{r['steps']:>6}"
                  f"{r['mask_us_median']:>12.1f}{r['mask_us_p95']:>8.1f}{str(r['all_forced_tokens_allowed']):>10}")
    _decode_table("llama.cpp decode", record["llama"])
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
