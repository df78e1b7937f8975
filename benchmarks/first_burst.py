"""A server's first burst after it starts: what `corejax serve`'s warm-up (`warmup="batches"`) buys against the
first-request warm-up (`warmup=True`), in fresh processes, alternated.

    python benchmarks/first_burst.py [--model smollm2-135m-instruct] [--streams 8] [--tokens 16] [--reps 2]

Each run is a new interpreter holding a sandboxed Session, as the server does, over its own corejax cache: the
model, native kernels and weights cache are linked from yours; the compiled programs start empty ("cold", a
first start) or are those of the previous run of the same warm-up ("warm", a restart). After start, `streams`
chat requests are sent at once from threads. Reported: seconds to start (Session until a 1-token reply), the
burst's wall time, and its slowest and fastest time to first token. Prints a table, writes
benchmarks/out/first_burst.json. With warmup=True the burst's batch and chunk shapes compile mid-serve, on every
start: a sandboxed worker persists only the programs it built before its first request."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
LINKED = ("models", "native", "weights")


def child(model: str, warmup: str, streams: int, tokens: int) -> dict:
    from corejax.client.session import Session

    t = time.perf_counter()
    s = Session(model, warmup=True if warmup == "first" else warmup, progress=False, keep_alive=0)
    s.generate("Hi", max_tokens=1)
    start = time.perf_counter() - t
    ttft: list[float | None] = [None] * streams

    def go(i: int) -> None:
        t0 = time.perf_counter()
        chat = [{"role": "user", "content": f"Write a short poem about the number {i} and the sea."}]
        for _ in s.stream(messages=chat, max_tokens=tokens, temperature=0):
            if ttft[i] is None:
                ttft[i] = time.perf_counter() - t0
    threads = [threading.Thread(target=go, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    burst = time.perf_counter() - t0
    s.close()
    got = [x for x in ttft if x is not None]
    return {"start_s": start, "burst_s": burst, "ttft_max_s": max(got), "ttft_min_s": min(got)}


def run(args: argparse.Namespace, warmup: str, cold: bool) -> dict:
    from corejax.paths import cache_dir

    cache = OUT / f"first-burst-cache-{warmup}"
    if cold:
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        for name in LINKED:
            if (cache_dir() / name).exists():
                (cache / name).symlink_to(cache_dir() / name)
    env = dict(os.environ, COREJAX_CACHE=str(cache))
    done = subprocess.run([sys.executable, __file__, "--child", warmup, "--model", args.model, "--streams",
                           str(args.streams), "--tokens", str(args.tokens)], env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {warmup} run failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), warmup=warmup, programs="cold" if cold else "warm")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child, args.streams, args.tokens)))
        return 0
    from corejax import hub

    hub.resolve(args.model, progress=True)  # pulled once, into your cache, before the runs link it
    rows = []
    for _ in range(args.reps):
        for cold in (True, False):
            for warmup in ("first", "batches"):
                rows.append(run(args, warmup, cold))
                r = rows[-1]
                print(f"{r['warmup']:8} {r['programs']:5} start {r['start_s']:6.2f} s  burst {r['burst_s']:5.2f} s  "
                      f"TTFT max {r['ttft_max_s']:5.2f} s  min {r['ttft_min_s']:5.2f} s", flush=True)
    OUT.mkdir(exist_ok=True)
    record = {"model": args.model, "streams": args.streams, "tokens": args.tokens, "runs": rows,
              "cpu_flags": next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                                 if ln.startswith("flags")), "")}
    (OUT / "first_burst.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {OUT / 'first_burst.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
