"""`corejax bench`: arguments, the run (suites, progress bar, skips), the table, JSON, plots, save and compare.

Exit status: 0, also when a peer is missing, crashes or times out (its row in the table and its `skipped` entry
say what happened and what to do: a peer's crash is not corejax's); 1 when corejax itself fails (a suite
raises, or corejax's own child crashes or times out) or when --compare flags a regression.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any

from corejax.types.config import DECODER_WEIGHTS

SUITES = ("generation", "embedding", "ipc", "startup", "tokenizer", "concurrency", "speculative", "micro")
PEER_TIMEOUT_S = 300.0  # a runtime's child without a finished step for this long is killed (--peer-timeout)
RUNTIMES = {
    "generation": ("corejax", "llama.cpp", "transformers"),
    "embedding": ("corejax", "corejax (in-process)", "onnxruntime", "sentence-transformers"),
    "ipc": ("corejax", "corejax (in-process)"),
    "startup": ("corejax (kept)", "corejax (own worker)"),
    "tokenizer": ("corejax", "hf-tokenizers", "llama.cpp"),
    "concurrency": ("corejax",),
    "speculative": ("corejax",),
    "micro": ("corejax",),
}


def add_parser(sub: Any) -> None:
    from corejax import hub

    p = sub.add_parser("bench", help="benchmark corejax beside llama.cpp, transformers, ONNX Runtime ...",
                       description="Benchmarks corejax beside its peers on the same model in the same run; prints a "
                                   "table, writes a JSON record (--json), plots (--plots), saves and compares "
                                   "baselines. Peers come from `pip install 'corejax[bench]'`. A peer that is "
                                   "missing, crashes, hangs past --peer-timeout or fails to import gets a row saying "
                                   "what happened and what to do, and the run goes on. Exit status: 0, also when a "
                                   "peer crashed; 1 when corejax itself fails (a suite, or corejax's own process "
                                   "crashing or timing out) or --compare finds a regression.")
    p.add_argument("--suite", nargs="+", default=["generation"], choices=SUITES + ("all",),
                   metavar="SUITE", help=f"what to measure: {', '.join(SUITES)} or all (default: generation)")
    p.add_argument("-m", "--model", default=hub.DEFAULT_MODEL, help="generative model: registry name or .gguf path "
                   f"(default: {hub.DEFAULT_MODEL})")
    p.add_argument("--embedding-model", default="all-minilm-l6-v2", help="encoder for the embedding suite")
    p.add_argument("--runtimes", nargs="+", default=None, metavar="NAME",
                   help="only these runtimes, e.g. corejax llama.cpp (default: every installed one)")
    p.add_argument("--reps", type=int, default=None, help="measured repetitions after the warm-up (default 3, "
                   "--quick 1)")
    p.add_argument("--quick", action="store_true",
                   help="a short run: 1 rep, prompts of 32 and 128 tokens, 16 decoded tokens, fewer requests")
    p.add_argument("--prompt-lengths", nargs="+", type=int, default=None, metavar="N",
                   help="generation prompt lengths in tokens (default 32 128 512)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded per request (default 64)")
    p.add_argument("--threads", type=int, default=None, help="threads for llama.cpp and torch (default: usable cores)")
    p.add_argument("--peer-timeout", type=float, default=PEER_TIMEOUT_S, metavar="SECONDS",
                   help="generation: kill a runtime's process (corejax's too) when it finishes no step — loading, "
                        "or one request — for this long, and report it as a timeout "
                        f"(default {PEER_TIMEOUT_S:g})")
    p.add_argument("--weights", choices=DECODER_WEIGHTS, default=None,
                   help="corejax weight mode in the generation suite (default: the Session's own choice — a "
                        "quantized GGUF stays quantized where the native kernel is loaded)")
    p.add_argument("--no-sandbox", dest="sandbox", action="store_false",
                   help="generation: run corejax in-process instead of the sandboxed worker")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the record here")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR",
                   help="write bench_<suite>.png here (default: beside --json, if given)")
    p.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                   help="write the record as a Markdown page (tables, fingerprint, plots), e.g. benchmarks/RESULTS.md")
    p.add_argument("--save", default=None, metavar="NAME", help="save the record as baseline NAME (or a .json path)")
    p.add_argument("--compare", default=None, metavar="NAME", help="compare with baseline NAME (or a .json path) "
                   "and flag regressions beyond the noise")
    p.add_argument("--threshold", type=float, default=None, help="smallest relative change flagged (default 0.05)")
    p.add_argument("--input", type=Path, default=None, metavar="PATH",
                   help="measure nothing: use this record (to compare, plot or save it)")
    p.add_argument("--schema", action="store_true", help="print the record's JSON schema and exit")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=main)


class Context:
    """What the suites see: the options, and add/skip/describe/step/child to record what they measure."""

    def __init__(self, args: argparse.Namespace, record: dict[str, Any], bar: Any):
        from corejax.bench.machine import usable_cores

        self.args, self.record, self.bar = args, record, bar
        self.quick = args.quick
        self.reps = args.reps or (1 if args.quick else 3)
        self.model, self.embedding_model = args.model, args.embedding_model
        self.prompt_lengths = args.prompt_lengths or ([32, 128] if args.quick else [32, 128, 512])
        self.decode_tokens = args.decode_tokens or (16 if args.quick else 64)
        self.threads = args.threads or usable_cores()
        self.weights, self.sandbox = args.weights, args.sandbox
        self.peer_timeout = args.peer_timeout
        self.failed = False
        self._bandwidth: float | None = None

    def runtimes(self, suite: str) -> list[str]:
        labels = list(RUNTIMES[suite])
        if suite == "generation" and (self.weights is not None or not self.sandbox):
            labels[0] = f"corejax ({', '.join(x for x in (self.weights, None if self.sandbox else 'in-process') if x)})"
        wanted = self.args.runtimes
        return [r for r in labels if wanted is None or r in wanted or r.split(" (")[0] in wanted]

    def add(self, suite: str, case: str, runtime: str, name: str, samples: list[float], unit: str,
            better: str = "higher") -> None:
        from corejax.bench.record import metric

        self.record["results"].append(metric(suite, case, runtime, name, samples, unit, better))

    def skip(self, suite: str, runtime: str, reason: str, steps: int = 0, status: str = "missing",
             **details: Any) -> None:
        """Records that `runtime` was not measured in `suite`: reason, status (see schema.py's SKIPPED_SCHEMA)
        and any of signal, returncode, output_tail, advice."""
        from corejax.bench.report import STATUS_WORDS

        entry = {"suite": suite, "runtime": runtime, "reason": reason, "status": status}
        entry.update((k, v) for k, v in details.items() if v is not None and v != "")
        self.record["skipped"].append(entry)
        self.bar.write(f"{runtime} ({suite}) {STATUS_WORDS[status]}: {reason}" if status in STATUS_WORDS else
                       f"skipped {runtime} ({suite}): {reason}")
        if entry.get("output_tail"):
            self.bar.write("\n".join(["  its last output:"] + ["    " + x for x in entry["output_tail"].splitlines()]))
        if entry.get("advice"):
            self.bar.write("  what to do: " + entry["advice"].replace("\n", "\n    "))
        self.step(steps)

    def peer_raised(self, suite: str, runtime: str, error: Exception, steps: int = 0) -> None:
        """A peer that raised in this process (the in-process suites load theirs here), e.g. an ImportError from
        deep inside the library: a "failed" row for it, not a failed suite."""
        from corejax.bench.child import TAIL_LINES

        text = str(error).strip()
        tail = "".join(traceback.format_exception(error)).strip().splitlines()[-TAIL_LINES:]
        self.skip(suite, runtime, f"raised {type(error).__name__}: {text.splitlines()[0][:200] if text else ''}",
                  steps=steps, status="failed", output_tail="\n".join(tail),
                  advice=self.advice(suite, runtime, "failed"))

    def advice(self, suite: str, runtime: str, status: str) -> str | None:
        from corejax.bench.advice import advice
        from corejax.bench.machine import cpu_flags

        others = [r.split(" (")[0] for r in RUNTIMES[suite] if r.split(" (")[0] != runtime.split(" (")[0]]
        version = self.record["fingerprint"].get("packages", {}).get("llama_cpp_python")
        return advice(runtime, status, others=others, flags=cpu_flags(), version=version, timeout=self.peer_timeout)

    def describe(self, suite: str, runtime: str, details: dict[str, Any]) -> None:
        """How `runtime` was set up in `suite`: record["runtimes"][runtime][suite]."""
        self.record["runtimes"].setdefault(runtime, {}).setdefault(suite, {}).update(details)

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def child(self, target: str, spec: dict[str, Any], suite: str, runtime: str, steps: int) -> dict | None:
        """Runs a runner in a fresh process, killed past --peer-timeout without a step. A peer that is missing,
        crashes, hangs or fails becomes a skip saying what happened and what to do; corejax doing so also
        fails the run."""
        from corejax.bench.child import ChildFailed, PeerMissing, run_child

        self.bar.set_postfix_str(f"{suite}: {runtime}")
        done = [0]

        def on_step() -> None:
            if done[0] < steps:
                done[0] += 1
                self.step()

        try:
            return run_child(target, spec, on_step, timeout=self.peer_timeout)
        except PeerMissing as e:
            self.skip(suite, runtime, str(e), status=e.status, advice=self.advice(suite, runtime, e.status))
        except ChildFailed as e:
            self.failed |= runtime.startswith("corejax")
            self.skip(suite, runtime, f"{e.what}; {e.steps} of {steps} steps done", status=e.status,
                      signal=e.signal, returncode=e.returncode, output_tail=e.output_tail,
                      advice=self.advice(suite, runtime, e.status))
        finally:
            self.step(steps - done[0])
        return None

    def read_bandwidth(self) -> float:
        """The machine's measured read bandwidth in bytes/s (the best of the samples: a ceiling), measured
        once per run and recorded in the 'machine' suite."""
        if self._bandwidth is None:
            from corejax.bench.machine import memory_bandwidth

            self.bar.set_postfix_str("memory bandwidth")
            bw = memory_bandwidth(mib=256 if self.quick else 512, threads=None)
            self.add("machine", f"numpy, {self.threads} threads", "numpy", "read_gb_s", bw["read"], "GB/s")
            self.add("machine", f"numpy, {self.threads} threads", "numpy", "copy_gb_s", bw["copy"], "GB/s")
            self._bandwidth = max(bw["read"]) * 1e9
        return self._bandwidth


def _config(ctx: Context, suites: list[str]) -> dict[str, Any]:
    return {"suites": suites, "model": ctx.model, "embedding_model": ctx.embedding_model, "reps": ctx.reps,
            "quick": ctx.quick, "prompt_lengths": ctx.prompt_lengths, "decode_tokens": ctx.decode_tokens,
            "threads": ctx.threads, "weights": ctx.weights, "sandbox": ctx.sandbox, "runtimes": ctx.args.runtimes,
            "peer_timeout_s": ctx.peer_timeout}


def measure(args: argparse.Namespace, command: str) -> tuple[dict[str, Any], bool]:
    """Runs the chosen suites; returns the record and whether corejax's part completed (a peer that did not
    run is in record["skipped"], and does not count)."""
    from tqdm.auto import tqdm

    from corejax.bench.machine import fingerprint, load_average
    from corejax.bench.record import new_record

    suites = list(SUITES) if "all" in args.suite else list(dict.fromkeys(args.suite))
    modules = {s: importlib.import_module(f"corejax.bench.{s}") for s in suites}
    record = new_record(command, {}, fingerprint())
    with tqdm(total=0, desc="corejax bench", unit="step", file=sys.stderr, disable=not args.progress,
              dynamic_ncols=True) as bar:
        ctx = Context(args, record, bar)
        record["config"] = _config(ctx, suites)
        bar.total = sum(m.steps(ctx) for m in modules.values())
        bar.refresh()
        busy = record["fingerprint"]["load_average"]
        if busy and busy[0] > 0.5 * ctx.threads:
            bar.write(f"note: the machine is busy (load average {busy[0]} on {ctx.threads} cores); the figures "
                      "will be noisy, multi-threaded peers most of all")
        ctx.read_bandwidth()
        for suite, module in modules.items():
            bar.set_postfix_str(suite)
            before = bar.n
            try:
                module.run(ctx)
            except Exception as e:  # noqa: BLE001 - one suite's failure is reported; the others still run
                ctx.failed = True
                bar.write(traceback.format_exc())
                ctx.skip(suite, "*", f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                         status="failed")
            bar.update(max(0, before + module.steps(ctx) - bar.n))
    record["fingerprint"]["load_average_end"] = load_average()
    return record, not ctx.failed


def _command_line() -> str:
    prog = Path(sys.argv[0])
    # `python -m corejax.cli` runs corejax/cli.py: the same command as the `corejax` script
    is_cli = prog.name == "corejax" or (prog.name == "cli.py" and prog.parent.name == "corejax")
    head = "corejax" if is_cli else f"python {sys.argv[0]}"
    return " ".join([head] + [shlex.quote(a) for a in sys.argv[1:]])


def _check(args: argparse.Namespace) -> None:
    from corejax.errors import InvalidParameterError

    bad = [(name, value, rule) for name, value, ok, rule in (
        ("--reps", args.reps, args.reps is None or args.reps >= 1, "at least 1"),
        ("--decode-tokens", args.decode_tokens, args.decode_tokens is None or args.decode_tokens >= 2,
         "at least 2 (decode speed is measured after the first token)"),
        ("--prompt-lengths", args.prompt_lengths, not args.prompt_lengths or min(args.prompt_lengths) >= 1,
         "at least 1 token each"),
        ("--threads", args.threads, args.threads is None or args.threads >= 1, "at least 1"),
        ("--threshold", args.threshold, args.threshold is None or args.threshold >= 0, "0 or more"),
        ("--peer-timeout", args.peer_timeout, args.peer_timeout > 0, "more than 0 seconds"),
    ) if not ok]
    if bad:
        name, value, rule = bad[0]
        raise InvalidParameterError(f"{name} must be {rule}; got {value}")


def main(args: argparse.Namespace) -> int:
    from corejax.bench import plots, report
    from corejax.bench import record as rec
    from corejax.bench.schema import SCHEMA

    _check(args)
    if args.schema:
        print(json.dumps(SCHEMA, indent=2))
        return 0
    threshold = rec.DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    ok = True
    if args.input is not None:
        record = rec.load_record(str(args.input))
    else:
        record, ok = measure(args, _command_line())
    print(report.record_table(record))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")
    folder = args.plots or (args.json.parent if args.json is not None else None)
    paths: list[Path] = []
    if folder is not None:
        try:
            paths = plots.plot_record(record, folder)
            print("plots: " + ", ".join(str(p) for p in paths))
        except ImportError:
            print("plots: skipped (pip install matplotlib, or 'corejax[bench]')")
    if args.markdown is not None:
        where = args.markdown.parent.absolute()
        pngs = {p.stem.removeprefix("bench_"): os.path.relpath(p.absolute(), where) for p in paths}
        args.markdown.write_text(report.markdown(record, pngs))
        print(f"wrote {args.markdown}")
    if args.compare is not None:
        old = rec.load_record(args.compare)
        rows = rec.compare(old, record, threshold)
        print(f"\n== compared with {args.compare} ({old['created']}) ==")
        print(report.comparison_table(rows, rec.fingerprint_differences(old, record)))
        if rec.regressions(rows):
            ok = False
    if args.save is not None:
        print(f"saved {rec.save_record(record, args.save)}")
    return 0 if ok else 1


def run_script(suites: list[str], script: str) -> None:
    """benchmarks/<name>.py: `corejax bench --suite SUITES` with its arguments, writing
    benchmarks/out/<name>.json (and the plots beside it) unless --json is given."""
    import argparse

    from corejax.errors import CorejaxError

    path = Path(script)
    default = [] if "--json" in sys.argv else ["--json", str(path.parent / "out" / f"{path.stem}.json")]
    parser = argparse.ArgumentParser(prog="corejax")  # the bench command alone: this module sits below cli.py
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "--suite", *suites, *default, *sys.argv[1:]])
    try:
        sys.exit(args.func(args))
    except CorejaxError as e:
        sys.exit(f"corejax: error: {e}")
