"""Load time and resident memory of a quantized GGUF: corejax without the weights cache (or another tree's corejax,
--before), with a cold cache (its file deleted first) and a warm one, and llama.cpp, alternated in fresh processes.

    python benchmarks/load_cache.py FILE.gguf [FILE2.gguf ...] --reps 2 --before /path/to/other/tree --tokens 4

Each run is a new interpreter: corejax's `open_runtime` in-process (no worker start), then `tokens` greedy tokens
(which fault every weight page in); llama.cpp's `Llama(model_path=..., n_ctx=512)` then the same number of
tokens. Reported: seconds to load, peak RSS (VmHWM) and RssAnon / RssFile after the tokens, in MiB. The model
file is in the page cache for every runtime (nothing here drops it)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) // 1024
    return out


def child(runtime: str, path: str, tokens: int, cache: str) -> None:
    if runtime == "llama.cpp":
        import llama_cpp

        t0 = time.perf_counter()
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=os.cpu_count(), verbose=False)
        load_s = time.perf_counter() - t0
        toks = [t for _, t in zip(range(tokens), llm.generate(llm.tokenize(b"the cat sat"), temp=0.0))]
        print(json.dumps({"load_s": load_s, "tokens": toks, **_status()}))
        return
    if cache == "0":
        os.environ["COREJAX_WEIGHTS_CACHE"] = "0"
    import corejax
    from corejax.hub import ModelSource
    from corejax.worker.start import open_runtime

    t0 = time.perf_counter()
    rt = open_runtime(ModelSource(Path(path).stem, "gguf", Path(path)), progress=False)
    load_s = time.perf_counter() - t0
    sp = corejax.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    toks = list(rt.stream("the cat sat", None, sp))[-1].result.tokens if tokens else []
    status = (rt.model.info.get("weights_cache") or {}).get("status")
    print(json.dumps({"load_s": load_s, "tokens": list(toks), "cache": status, **_status()}))


def _run(runtime: str, path: Path, tokens: int, pythonpath: str, cache: str = "1") -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    out = subprocess.run([sys.executable, __file__, "--child", runtime, str(path), str(tokens), cache], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{runtime} on {path.name} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--before", help="a source tree whose corejax is the 'before' (default: this one, cache off)")
    ap.add_argument("--child", nargs=4)
    args = ap.parse_args()
    if args.child:
        runtime, path, tokens, cache = args.child
        child(runtime, path, int(tokens), cache)
        return
    sys.path.insert(0, str(ROOT))
    from corejax.kernels import ffi

    from corejax.types import weights_file

    ffi.ensure()
    here = str(ROOT)
    rows = []
    for path in args.files:
        cached = weights_file.cache_file(path, ffi.library_key())
        for rep in range(args.reps):
            runs = [("before", "corejax", args.before or here, "1" if args.before else "0"),
                    ("cold cache", "corejax", here, "1"), ("warm cache", "corejax", here, "1"),
                    ("llama.cpp", "llama.cpp", here, "1")]
            for label, runtime, tree, cache in runs:
                if label == "cold cache":
                    cached.unlink(missing_ok=True)
                r = _run(runtime, path, args.tokens, tree, cache)
                rows.append({"file": path.name, "rep": rep, "runtime": label, **r})
                print(f"{path.name:<32} {rep} {label:<11} load {r['load_s']:6.2f} s  peak {r['VmHWM']:6d} MiB  "
                      f"anon {r['RssAnon']:6d}  file {r['RssFile']:6d}  cache {r.get('cache', '-')}  "
                      f"tokens {r['tokens']}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
