"""Serving under concurrent streams, corejax beside llama.cpp on the same GGUF and 2 threads, in one run (issue 38).

    python benchmarks/serving.py [--models smollm2 gemma3 1.1b] [--streams 1 2 4 8 16 32] [--tokens 128]
                                 [--prompt-tokens 128] [--reps 2] [--llama-cpp DIR] [--shapes-dir DIR] [--quick]

For each model and each number of streams N:
  corejax serve   `corejax serve -m FILE` on a free loopback port; N streaming /v1/completions requests at once
                  through the real `openai` client (AsyncOpenAI, SSE)
  llama-server    llama.cpp's server, `-np N -c N*(prompt+tokens+64) --cont-batching -t T -tb T`, restarted
                  per N, under the same client load
  corejax Session the in-process API: N threads on one sandboxed Session (corejax/bench/concurrency.py's burst)
  batched-bench   `llama-batched-bench -npp P -ntg T -npl 1,2,...` (llama.cpp's batched decode without a
                  server), parsed from its table
Every request has its own prompt of about --prompt-tokens tokens (a distinct first word and number, so no
runtime's prefix cache shares anything), decodes greedily exactly --tokens tokens (ignore_eos), and each N
runs once unmeasured first (new batch shapes compile outside the measurement). The two servers alternate per
N and per repetition (corejax serve, llama-server, corejax serve, ...). Figures: aggregate tok/s (all
streams' generated tokens / wall time from the first request to the last token), per-stream tok/s (each
stream's tokens / its own wall time, mean), TTFT P50/P95 and the P95 of the gaps between a stream's chunks
(inter-token; each SSE chunk carries one piece of text, `tok/chunk` in the JSON says how many tokens that is).

Prints a table per model and the goals (checked and shown, not asserted): aggregate at 8 streams >= 5x one
stream; 2 streams never below 1x; corejax serve's aggregate >= 1.2x llama-server's at every N with an
inter-token P95 no worse. Writes benchmarks/out/serving.json. llama.cpp's programs come from --llama-cpp DIR or
the cached build that serving_llama.py makes (~/.cache/corejax-bench/llama.cpp-<version>). Run it on an idle
machine: the full grid takes an hour or more on 2 cores (the 1.1B shape about half of it); --quick (SmolLM2,
1/2/4 streams, 16 tokens, one repetition) checks that everything runs, in about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_llama

OUT = Path(__file__).resolve().parent / "out"
REGISTRY = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}
RUNTIMES = ("corejax serve", "llama-server", "corejax Session", "batched-bench")
WORDS = ("Amber", "Birch", "Cobalt", "Delta", "Ember", "Falcon", "Garnet", "Harbor", "Indigo", "Juniper", "Kestrel",
         "Lantern", "Meadow", "Nectar", "Orchid", "Pebble", "Quartz", "Raven", "Saffron", "Thistle", "Umber",
         "Velvet", "Willow", "Xenon", "Yarrow", "Zephyr", "Anchor", "Beacon", "Canyon", "Dune", "Echo", "Fjord")


def model_file(name: str, shapes_dir: str | None) -> Path:
    if name in REGISTRY:
        from corejax import hub

        return hub.resolve(REGISTRY[name], progress=True).path
    if Path(name).suffix == ".gguf":
        return Path(name)
    import shapes

    if shapes_dir and (Path(shapes_dir) / shapes.path_for(name).name).is_file():
        return Path(shapes_dir) / shapes.path_for(name).name
    return shapes.build(name)  # cached under benchmarks/out/shapes; made once (minutes)


class Prompts:
    """Prompts of about n tokens for one model, each starting with its own word and number."""

    def __init__(self, path: Path, n: int) -> None:
        from corejax import hub
        from corejax.bench.text import corejax_tokenizer, prompt_of

        tokenizer = corejax_tokenizer(hub.resolve(str(path), progress=False))
        self.body = prompt_of(lambda t: len(tokenizer.encode(t)), n - 8)  # room for "Word 12, " and BOS
        self.count = 0

    def take(self, k: int) -> list[str]:
        out = [f"{WORDS[(self.count + i) % len(WORDS)]} {self.count + i}, {self.body}" for i in range(k)]
        self.count += k
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a loopback port, up once GET /v1/models answers; its output goes to `log`."""

    def __init__(self, cmd: list[str], port: int, log: Path, startup_s: float = 600) -> None:
        import openai

        print("+ " + " ".join(cmd), flush=True)
        self.log = log.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=self.base, api_key="none", max_retries=0, timeout=10)
        deadline = time.monotonic() + startup_s
        while True:
            try:
                self.model = client.models.list().data[0].id
                return
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{cmd[0]} did not start; see {log}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def _streams(base: str, model: str, prompts: list[str], tokens: int) -> list[dict]:
    import openai

    async with openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=1800) as client:
        async def one(prompt: str) -> dict:
            t0 = time.perf_counter()
            times, usage = [t0], None
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    times.append(time.perf_counter())
                if chunk.usage is not None:
                    usage = chunk.usage
            generated = usage.completion_tokens if usage else len(times) - 1
            return {"times": times, "tokens": generated, "prompt_tokens": usage.prompt_tokens if usage else None}

        return await asyncio.gather(*(one(p) for p in prompts))


def serve_burst(server: Server, prompts: list[str], tokens: int) -> list[dict]:
    return asyncio.run(_streams(server.base, server.model, prompts, tokens))


def session_burst(session, prompts: list[str], tokens: int) -> list[dict]:
    from corejax.bench.concurrency import burst

    arrivals: list[list[float]] = []
    burst(session, len(prompts), tokens, prompts=prompts, arrivals=arrivals)
    return [{"times": t, "tokens": tokens, "prompt_tokens": None} for t in arrivals]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(bursts: list[list[dict]]) -> dict:
    """One level's figures over its measured bursts (each a list of streams)."""
    agg, per_stream, ttft, gaps, chunks, tokens = [], [], [], [], 0, 0
    for streams in bursts:
        start = min(s["times"][0] for s in streams)
        end = max(s["times"][-1] for s in streams)
        agg.append(sum(s["tokens"] for s in streams) / (end - start))
        for s in streams:
            t = s["times"]
            per_stream.append(s["tokens"] / (t[-1] - t[0]))
            if len(t) > 1:
                ttft.append(t[1] - t[0])
            gaps += [b - a for a, b in itertools.pairwise(t[1:])]
            chunks += len(t) - 1
            tokens += s["tokens"]
    prompt = [s["prompt_tokens"] for b in bursts for s in b if s["prompt_tokens"]]
    return {"aggregate_tok_s": statistics.mean(agg), "aggregate_runs": agg,
            "per_stream_tok_s": statistics.mean(per_stream), "ttft_p50_s": _pct(ttft, 50),
            "ttft_p95_s": _pct(ttft, 95), "itl_p95_s": _pct(gaps, 95), "itl_p50_s": _pct(gaps, 50),
            "tok_per_chunk": tokens / chunks if chunks else None,
            "prompt_tokens": statistics.mean(prompt) if prompt else None}


def run_model(name: str, args: argparse.Namespace, programs: dict) -> dict:
    path = model_file(name, args.shapes_dir)
    print(f"\n== {name}: {path} ==", flush=True)
    prompts = Prompts(path, args.prompt_tokens)
    from corejax.loading.gguf import read_gguf

    with read_gguf(path) as f:
        context = int(f.metadata[f"{f.metadata['general.architecture']}.context_length"])
    if max(args.streams) * (args.prompt_tokens + args.tokens) > context:
        print(f"note: {max(args.streams)} streams of {args.prompt_tokens}+{args.tokens} tokens are over the model's "
              f"context ({context}), which bounds corejax's KV pool: some streams may wait for pages", flush=True)
    ctx_per_stream = args.prompt_tokens + args.tokens + 64
    results: dict[str, dict] = {rt: {} for rt in args.runtimes}
    logs = OUT / "serving-logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = path.stem if name.endswith(".gguf") else name  # the logs' and the table's name for a path
    for old in logs.glob(f"{name}-*.log"):  # this run's logs only (the servers' append, one start per level)
        old.unlink()

    if "batched-bench" in args.runtimes:
        try:
            runs = [serving_llama.batched_bench(programs["llama-batched-bench"], path, args.prompt_tokens,
                                                args.tokens, args.streams, args.threads,
                                                logs / f"{name}-batched-bench-{rep}.log", args.peer_timeout)
                    for rep in range(args.reps)]
            for n in args.streams:
                rows = [run[n] for run in runs if n in run]
                if rows:  # the mean of each figure over the repetitions
                    results["batched-bench"][str(n)] = {
                        **{k: statistics.mean(r[k] for r in rows) for k in rows[0]},
                        "aggregate_runs": [r["aggregate_tok_s"] for r in rows]}
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            results["batched-bench"] = {"error": str(e)}
            print(f"batched-bench: {e}", flush=True)

    if "corejax Session" in args.runtimes:
        import corejax

        with corejax.Session(str(path), progress=False, prefix_cache=False, keep_alive=0) as session:
            for n in args.streams:
                session_burst(session, prompts.take(n), args.tokens)  # warm-up
                measured = [session_burst(session, prompts.take(n), args.tokens) for _ in range(args.reps)]
                results["corejax Session"][str(n)] = summarize(measured)
                print(f"corejax Session  streams={n:<3} {results['corejax Session'][str(n)]['aggregate_tok_s']:8.1f}"
                      " tok/s", flush=True)

    servers = [rt for rt in ("corejax serve", "llama-server") if rt in args.runtimes]
    if servers:
        cj = None
        if "corejax serve" in servers:
            port = free_port()
            cj = Server([sys.executable, "-m", "corejax.cli", "serve", "-m", str(path), "--port", str(port),
                         "--max-tokens", str(max(args.tokens, 16))], port, logs / f"{name}-corejax-serve.log")
        try:
            for n in args.streams:
                llama = None
                if "llama-server" in servers:
                    port = free_port()
                    llama = Server(serving_llama.server_command(programs["llama-server"], path, port, n,
                                                                ctx_per_stream, args.threads),
                                   port, logs / f"{name}-llama-server.log")
                try:
                    pair = [(rt, s) for rt, s in (("corejax serve", cj), ("llama-server", llama)) if s]
                    for _, server in pair:
                        serve_burst(server, prompts.take(n), args.tokens)  # warm-up
                    measured: dict[str, list] = {rt: [] for rt, _ in pair}
                    for _ in range(args.reps):
                        for rt, server in pair:
                            measured[rt].append(serve_burst(server, prompts.take(n), args.tokens))
                    for rt, _ in pair:
                        results[rt][str(n)] = summarize(measured[rt])
                        print(f"{rt:<16} streams={n:<3} {results[rt][str(n)]['aggregate_tok_s']:8.1f} tok/s",
                              flush=True)
                finally:
                    if llama:
                        llama.stop()
        finally:
            if cj:
                cj.stop()
    return {"model": name, "file": str(path), "runtimes": results}


def _f(v: float | None, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v * scale)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(record: dict, streams: list[int]) -> list[str]:
    lines = [f"\n== {record['model']} ({Path(record['file']).name}) ==",
             (f"{'streams':>7} {'runtime':<16} {'agg tok/s':>10} {'x 1 str':>8} {'str tok/s':>10} "
              f"{'TTFT p50':>9} {'TTFT p95':>9} {'ITL p95':>8}   (times in ms)")]
    rts = record["runtimes"]
    for n in streams:
        for rt, levels in rts.items():
            row = levels.get(str(n))
            if not row:
                continue
            one = levels.get("1") or levels.get(str(streams[0]))
            scale = row["aggregate_tok_s"] / one["aggregate_tok_s"] if one else None
            ttft50 = row.get("ttft_p50_s", row.get("ttft_s"))
            ttft95 = row.get("ttft_p95_s", row.get("ttft_s"))
            lines.append(f"{n:>7} {rt:<16} {row['aggregate_tok_s']:>10.1f} {_f(scale, fmt='{:.2f}x'):>8} "
                         f"{row['per_stream_tok_s']:>10.1f} {_f(ttft50, 1e3):>9} {_f(ttft95, 1e3):>9} "
                         f"{_f(row.get('itl_p95_s'), 1e3):>8}")
        serve, peer = rts.get("corejax serve", {}).get(str(n)), rts.get("llama-server", {}).get(str(n))
        if serve and peer:
            x = {key: _ratio(serve.get(key), peer.get(key)) for key in
                 ("aggregate_tok_s", "per_stream_tok_s", "ttft_p50_s", "ttft_p95_s", "itl_p95_s")}
            lines.append(f"{'':>7} {'serve/llama-srv':<16} {x['aggregate_tok_s']:>10} {'':>8} "
                         f"{x['per_stream_tok_s']:>10} {x['ttft_p50_s']:>9} {x['ttft_p95_s']:>9} {x['itl_p95_s']:>8}")
    return lines


def goals(record: dict) -> list[dict]:
    """The issue's goals for this model, each {goal, runtime, ok, detail}; None for ok where not measured."""
    out = []
    rts = record["runtimes"]
    for rt in ("corejax serve", "corejax Session", "llama-server", "batched-bench"):
        levels = rts.get(rt) or {}
        one = levels.get("1")
        if not one or "error" in levels:
            continue
        if "8" in levels:
            x = levels["8"]["aggregate_tok_s"] / one["aggregate_tok_s"]
            out.append({"goal": "aggregate at 8 streams >= 5x one stream", "runtime": rt, "ok": x >= 5,
                        "detail": f"{x:.2f}x"})
        if "2" in levels:
            x = levels["2"]["aggregate_tok_s"] / one["aggregate_tok_s"]
            out.append({"goal": "2 streams never below 1x", "runtime": rt, "ok": x >= 1, "detail": f"{x:.2f}x"})
    serve, peer = rts.get("corejax serve") or {}, rts.get("llama-server") or {}
    common = [n for n in serve if n in peer]
    if common:
        agg = {n: serve[n]["aggregate_tok_s"] / peer[n]["aggregate_tok_s"] for n in common}
        itl = {n: serve[n]["itl_p95_s"] / peer[n]["itl_p95_s"] for n in common
               if serve[n]["itl_p95_s"] and peer[n]["itl_p95_s"]}
        out.append({"goal": "corejax serve aggregate >= 1.2x llama-server's at every stream count",
                    "runtime": "corejax serve", "ok": all(v >= 1.2 for v in agg.values()),
                    "detail": " ".join(f"{n}:{v:.2f}x" for n, v in agg.items())})
        out.append({"goal": "corejax serve inter-token P95 no worse than llama-server's",
                    "runtime": "corejax serve", "ok": all(v <= 1.0 for v in itl.values()) if itl else None,
                    "detail": " ".join(f"{n}:{v:.2f}x" for n, v in itl.items())})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3", "1.1b"],
                    help="smollm2, gemma3 (registry files), 1.1b (benchmarks/shapes.py) or a .gguf path")
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per stream")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2, help="measured bursts per runtime and stream count")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's -t/-tb (corejax: XLA's, all cores)")
    ap.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES), metavar="RUNTIME",
                    help=f"any of: {', '.join(repr(r) for r in RUNTIMES)}")
    ap.add_argument("--llama-cpp", help="a llama.cpp build folder with llama-server and llama-batched-bench "
                                        "(default: the cached build, made if missing)")
    ap.add_argument("--shapes-dir", help="where benchmarks/shapes.py's GGUFs already are (default: its own folder)")
    ap.add_argument("--peer-timeout", type=float, default=1800, help="seconds llama-batched-bench may run")
    ap.add_argument("--quick", action="store_true", help="smollm2, streams 1 2 4, 16 tokens, one repetition")
    ap.add_argument("--json", default=str(OUT / "serving.json"))
    args = ap.parse_args()
    if args.reps < 1 or args.tokens < 2 or args.prompt_tokens < 16 or min(args.streams) < 1:
        ap.error("--reps and --streams need at least 1, --tokens 2 (an inter-token gap), --prompt-tokens 16")
    if args.quick:
        args.models, args.streams, args.tokens, args.reps = ["smollm2"], [1, 2, 4], 16, 1
    from corejax.bench.machine import fingerprint, load_average, usable_cores

    if usable_cores() != args.threads:
        print(f"note: {usable_cores()} usable cores; llama.cpp runs on --threads {args.threads}, corejax's XLA "
              "on all of them (the comparison is like for like only where they match)", flush=True)

    if load_average()[0] > 0.5:
        print(f"note: load average {load_average()[0]:.2f} before the start: the figures are only worth comparing "
              "on an idle machine (llama.cpp's spinning threads suffer most from a busy one)", flush=True)
    needs_llama = {"llama-server", "batched-bench"} & set(args.runtimes)
    programs = serving_llama.locate(args.llama_cpp) if needs_llama else {}
    t0 = time.perf_counter()
    record = {"args": vars(args), "machine": fingerprint(), "load_at_start": load_average(),
              "llama_cpp": {k: str(v) for k, v in programs.items()}, "models": []}
    lines: list[str] = []
    for name in args.models:
        m = run_model(name, args, programs)
        m["goals"] = goals(m)
        record["models"].append(m)
        lines += table(m, args.streams)
        lines += [f"  goal {'met' if g['ok'] else 'MISSED' if g['ok'] is False else 'n/a':>6}: {g['goal']} "
                  f"[{g['runtime']}] {g['detail']}" for g in m["goals"]]
    record["seconds"] = time.perf_counter() - t0
    record["load_at_end"] = load_average()
    print("\n".join(lines))
    print(f"\n{args.tokens} tokens per stream, prompts of ~{args.prompt_tokens} tokens, {args.reps} repetition(s); "
          f"load average {record['load_at_start']} at the start, {record['load_at_end']} at the end; "
          f"{record['seconds']:.0f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
