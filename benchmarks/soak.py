"""Soak: `corejax serve` under concurrent streaming clients with random cancellations, for a fixed time (issue 41).

    python benchmarks/soak.py [--minutes 20] [--clients 8] [--model smollm2-135m-instruct] [--seed 0]

Starts `corejax serve` on a free loopback port (nothing else is contacted) and runs --clients threads, each with
the real `openai` client: streaming chat completions of random lengths, about a third closed after a random
number of chunks (the client goes away mid-stream), a few non-streamed ones. Every --sample-s it samples the
server process tree (the server and its sandboxed worker): RSS, open file descriptors, threads. After the warm-up
(--warmup-s) the figures must stay flat: RSS growth <= 5% of the value at the end of the warm-up, no fd or thread
growth (the least of the last three samples against the first after the warm-up: a
connection open at one sample is not a leak); and no request may fail (a cancelled stream is not a failure). Prints the table of samples and the
verdict, writes benchmarks/out/soak.json and benchmarks/out/soak.png (the curves). Exit status 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
PROMPTS = ["Tell me a story about a lighthouse.", "What is the capital of France?", "Write a haiku about rain.",
           "List three uses of copper.", "Explain what a compiler does.", "Say hello in five languages."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc's children lists)."""
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                stack += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _sample(pid: int) -> dict:
    rss = fds = threads = 0
    for p in _tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            rss += int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
            threads += int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except (OSError, StopIteration):
            pass
    return {"rss_mb": rss / 2**20, "fds": fds, "threads": threads, "processes": len(_tree(pid))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-s", type=float, default=60)
    ap.add_argument("--sample-s", type=float, default=10)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--json", default=str(OUT / "soak.json"))
    args = ap.parse_args()
    import openai

    port = _free_port()
    OUT.mkdir(parents=True, exist_ok=True)
    log = open(OUT / "soak-serve.log", "wb")  # noqa: SIM115 - the server's log, closed at the end
    server = subprocess.Popen([sys.executable, "-c", "from corejax.cli import main; raise SystemExit(main())", "serve", "-m", args.model, "--port", str(port),
                               "--max-tokens", "1024"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=300)
    deadline = time.monotonic() + 300
    while True:
        try:
            client.models.list()
            break
        except Exception:  # noqa: BLE001 - not up yet
            if server.poll() is not None or time.monotonic() > deadline:
                print("the server did not start; see benchmarks/out/soak-serve.log")
                return 1
            time.sleep(0.5)

    stop = threading.Event()
    lock = threading.Lock()
    counts = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0, "tokens": 0}
    failures: list[str] = []

    def worker(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        while not stop.is_set():
            prompt = rng.choice(PROMPTS)
            max_tokens = rng.randint(8, args.max_tokens)
            cancel_after = rng.randint(1, max_tokens) if rng.random() < 0.35 else None
            try:
                with lock:
                    counts["requests"] += 1
                if rng.random() < 0.15:
                    r = client.chat.completions.create(model=args.model, max_tokens=max_tokens, temperature=0.7,
                                                       messages=[{"role": "user", "content": prompt}])
                    with lock:
                        counts["completed"] += 1
                        counts["tokens"] += r.usage.completion_tokens
                    continue
                stream = client.chat.completions.create(model=args.model, max_tokens=max_tokens, temperature=0.7,
                                                        messages=[{"role": "user", "content": prompt}], stream=True)
                n = 0
                for _ in stream:
                    n += 1
                    if cancel_after is not None and n >= cancel_after:
                        stream.close()  # the client goes away mid-stream
                        break
                with lock:
                    counts["cancelled" if cancel_after is not None and n >= cancel_after else "completed"] += 1
                    counts["tokens"] += n
            except Exception as e:  # noqa: BLE001 - counted and shown: a soak must have none
                with lock:
                    counts["failed"] += 1
                    if len(failures) < 20:
                        failures.append(f"{type(e).__name__}: {str(e)[:200]}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    samples = []
    end = t0 + args.minutes * 60
    print(f"{'t (s)':>7} {'RSS MB':>8} {'fds':>5} {'threads':>8} {'requests':>9} {'failed':>7} {'tok/s':>7}")
    last_tokens, last_t = 0, t0
    while time.monotonic() < end and server.poll() is None:
        time.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
        now = time.monotonic()
        s = _sample(server.pid)
        with lock:
            s.update(t=now - t0, **counts)
        s["tok_s"] = (s["tokens"] - last_tokens) / max(now - last_t, 1e-9)
        last_tokens, last_t = s["tokens"], now
        samples.append(s)
        print(f"{s['t']:>7.0f} {s['rss_mb']:>8.1f} {s['fds']:>5} {s['threads']:>8} {s['requests']:>9} "
              f"{s['failed']:>7} {s['tok_s']:>7.1f}", flush=True)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    alive = server.poll() is None
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()

    after = [s for s in samples if s["t"] >= args.warmup_s]
    verdict = {"server_alive": alive, "failed": counts["failed"], "failures": failures}
    if len(after) >= 2:
        ref, peak = after[0], max(after, key=lambda s: s["rss_mb"])
        tail = after[-3:]  # a leak stays; a connection or request thread open at one sample does not
        verdict.update(rss_growth=peak["rss_mb"] / ref["rss_mb"] - 1, fd_growth=min(s["fds"] for s in tail) -
                       ref["fds"], thread_growth=min(s["threads"] for s in tail) - ref["threads"],
                       last_rss_growth=after[-1]["rss_mb"] / ref["rss_mb"] - 1)
    ok = (alive and counts["failed"] == 0 and len(after) >= 2 and verdict["rss_growth"] <= 0.05
          and verdict["fd_growth"] <= 0 and verdict["thread_growth"] <= 0)
    verdict["ok"] = ok
    print(json.dumps({k: v for k, v in {**counts, **verdict}.items()}, indent=1))
    Path(args.json).write_text(json.dumps({"args": vars(args), "counts": counts, "verdict": verdict,
                                           "samples": samples}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
        ts = [s["t"] for s in samples]
        for ax, key, label in zip(axes, ("rss_mb", "fds", "threads"), ("RSS (MB), server + worker", "open fds",
                                                                         "threads")):
            ax.plot(ts, [s[key] for s in samples])
            ax.axvline(args.warmup_s, color="grey", linestyle=":")
            ax.set_ylabel(label)
        axes[-1].set_xlabel("seconds")
        fig.suptitle(f"corejax serve soak: {args.clients} streaming clients, {args.model}")
        fig.tight_layout()
        fig.savefig(Path(args.json).with_suffix(".png"))
    except ImportError:
        pass
    print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
