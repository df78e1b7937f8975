"""Coverage-guided fuzzing of every parser corejax runs on untrusted bytes (issue 41), with atheris (libFuzzer).

    python benchmarks/fuzz.py [--runs 10000] [--targets gguf safetensors config tokenizer template frames request]

Each target runs in a process of its own: the corejax modules it reaches are instrumented for coverage, a small
valid input of its kind seeds the corpus, and libFuzzer mutates from there (-runs inputs). An input passes when
it ends in a corejax error (the target's `allowed`) or a result; anything else, a time over --timeout-s or memory
over --rss-mb, is a crash: libFuzzer writes the input under benchmarks/out/fuzz/<target>/ and the run stops. Make a
crash a regression test by copying its file to tests/fuzz_regressions/<target>/ (tests/test_fuzz.py replays them).

Prints per target: inputs run, coverage (libFuzzer's edge count over the instrumented modules), crashes, the
slowest input and the peak RSS; writes benchmarks/out/fuzz.json. Targets:
  gguf         the GGUF reader: header, metadata of every value type, tensor table, offsets, quant block sizes
  safetensors  a safetensors file's header, as the loader sizes a folder and reads its tensors
  config       config.json into a decoder's or an encoder's config
  tokenizer    tokenizer.json + tokenizer_config.json into a Tokenizer, then encode and decode
  template     hostile Jinja chat templates (sandbox escapes, huge loops, recursion) rendered over messages
  frames       the parent's decoding of worker frames (a compromised worker sends anything)
  request      the server's request parsing (JSON body into a generation or embedding request)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuzz_mutators import MUTATORS, frame_mutator, json_mutator

OUT = Path(__file__).resolve().parent / "out"
TARGETS = ("gguf", "safetensors", "config", "tokenizer", "template", "frames", "request")
SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


# ----------------------------------------------------------------------------------------------- seeds


def _seed_gguf() -> bytes:
    import gguf
    import numpy as np

    path = SCRATCH / f"corejax-fuzz-seed-{os.getpid()}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_head_count(2)
    w.add_uint8("t.u8", 7)
    w.add_int16("t.i16", -3)
    w.add_float64("t.f64", 0.5)
    w.add_bool("t.b", True)
    w.add_array("t.strs", ["a", "bc"])
    w.add_array("t.ints", [1, 2, 3])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((4, 32)).astype(np.float32))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("b.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    q4 = gguf.quants.quantize(rng.standard_normal((2, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("c.weight", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    path.unlink()
    return data


def _seed_safetensors() -> bytes:
    header = {"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b.weight": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}, "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(24)


def _seed_config() -> bytes:
    return json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                       "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 128,
                       "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
                       "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}).encode()


def _seed_tokenizer() -> bytes:
    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa"])}
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": 1, "content": "<s>", "special": True, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False}],
           "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                                 "trim_offsets": True, "use_regex": True},
           "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                               "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                     "merges": ["a b", "Ġ a"]}}
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
              "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}
    return json.dumps(tok).encode() + b"\n\x00\n" + json.dumps(config).encode()


# Hostile templates (each must end in a TemplateError within the bounds of corejax/tokenizer/chat.py), seeds
# beside a real-looking one.
HOSTILE_TEMPLATES = (
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ 'x' * 10000000000 }}",
    "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}{{ d('a', 60) }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ 2 ** 100000000 }}",
    "{{ 'x' | center(10000000000) }}",
    "{{ '%10000000000s' | format('x') }}",
    "{{ '%10000000000s' % 'x' }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s | replace('a', 'aa') %}{% endfor %}",
    "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "{{ ([1] * 100000000) | length }}",
    "{{ (range(100000) | list) | join('x' * 1000) }}",
)


def _seed_template() -> list[bytes]:
    return [t.encode() for t in HOSTILE_TEMPLATES] + [_real_template()]


def _real_template() -> bytes:
    return (b"{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}<<SYS>>{{ message"
            b"['content'] | trim }}<</SYS>>{% elif loop.index0 % 2 == 0 %}[INST] {{ message['content'] }} [/INST]"
            b"{% else %}{{ message['content'] | tojson }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
            b"{{ 'x' * 3 }}{% set ns = namespace(a=1) %}{% set ns.a = ns.a + 1 %}{{ ns.a }}{% endif %}")


def _frame_kinds() -> list:
    """The request kinds whose RESULT frames the parent reads, in a fixed order (an input's first byte picks one)."""
    from corejax.wire import messages as m

    return sorted(m.RESULTS, key=int)


def _seed_frames() -> list[bytes]:
    import numpy as np

    from corejax.types.results import Chunk, GenerationResult, Timings, TokenLogprob
    from corejax.wire import messages as m
    from corejax.wire.protocol import Kind, encode

    kinds = _frame_kinds()
    lp = TokenLogprob(5, "hi", -0.5, ((5, -0.5), (6, -1.0)), ("hi", "ho"))
    result = GenerationResult("hi there", (5, 6), "stop", (1, 2, 3), Timings(0.1, 3, 0, 2, 0.01, 100.0, 50.0, 0.05),
                              (lp, lp))
    results = {Kind.GENERATE: m.Generated(result), Kind.TOKENIZE: m.Tokens([1, 2, 3]), Kind.DETOKENIZE: m.Text("hi"),
               Kind.INFO: m.Info({"name": "x", "kv_pages_total": 3}),
               Kind.EMBED: m.Embeddings(np.ones((2, 4), np.float32)),
               Kind.CLASSIFY: m.Scores(["a", "b"], np.full((1, 2), 0.5, np.float32)), Kind.PING: m.Value(1)}
    seeds = []
    for kind, value in results.items():
        seeds.append(bytes([kinds.index(kind)]) + encode(Kind.RESULT, 3, value.to_wire()))
    seeds.append(b"\0" + encode(Kind.CHUNK, 3, m.chunk_to_wire(Chunk("hello", (5, 6), (lp,)))))
    seeds.append(b"\0" + encode(Kind.ERROR, 3, m.error_to_wire(ValueError("boom"))))
    seeds.append(b"\0" + encode(Kind.ENDED, 3, {"ended": m.Ended.CRASHED.value, "message": "it died"}))
    return seeds


def _seed_request() -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                       "temperature": 0.5, "stop": ["x"], "logprobs": True, "top_logprobs": 2, "n": 2, "seed": 1,
                       "stream": True, "stream_options": {"include_usage": True},
                       "response_format": {"type": "json_schema", "json_schema": {"schema": {
                           "type": "object", "properties": {"a": {"type": "integer"}}}}}}).encode()


# ----------------------------------------------------------------------------------------------- targets


def _gguf(data: bytes) -> None:
    from corejax.loading.gguf import read_gguf

    path = SCRATCH / f"corejax-fuzz-{os.getpid()}.gguf"
    path.write_bytes(data)
    try:
        f = read_gguf(path)
        try:
            for name, info in list(f.tensors.items())[:8]:
                f.raw(name)
                if info.nbytes <= 1 << 16:
                    f.dequantize(name)
        finally:
            f.close()
    finally:
        path.unlink(missing_ok=True)


def _safetensors(data: bytes) -> None:
    from corejax.loading.loader import _safetensors_table

    folder = SCRATCH / f"corejax-fuzz-st-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(data)
    try:
        _safetensors_table(folder)
    finally:
        (folder / "model.safetensors").unlink(missing_ok=True)


def _config(data: bytes) -> None:
    from corejax.loading.encoder import read_hf_config
    from corejax.types.config import EncoderConfig, ModelConfig, is_encoder_config

    folder = SCRATCH / f"corejax-fuzz-cfg-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(data)
    config = read_hf_config(folder)
    if is_encoder_config(config):
        EncoderConfig.from_hf(config, with_head=False)
    else:
        ModelConfig.from_hf(config)


def _tokenizer(data: bytes) -> None:
    from corejax.tokenizer.files import tokenizer_from_files

    tok, _, config = data.partition(b"\n\x00\n")
    folder = SCRATCH / f"corejax-fuzz-tok-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_bytes(tok)
    (folder / "tokenizer_config.json").write_bytes(config)
    t = tokenizer_from_files(folder)
    ids = t.encode("ab a<s>", add_special=True)
    t.decode(ids)


def _template(data: bytes) -> None:
    from corejax.tokenizer.chat import render_chat_template

    text = data.decode("utf-8", "replace")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    render_chat_template(text, messages, bos_token="<s>", eos_token="</s>")


def _frames(data: bytes) -> None:
    from corejax.wire import messages as m
    from corejax.wire.protocol import Kind, decode

    if not data:
        return
    kinds = _frame_kinds()
    request_kind = kinds[data[0] % len(kinds)]
    frame = decode(data[1:])
    if frame.kind == Kind.CHUNK:
        m.chunk_from_wire(frame.payload)
    elif frame.kind == Kind.ERROR:
        m.error_from_wire(frame.payload)
    elif frame.kind == Kind.ENDED:  # as corejax/client/keepalive.py reads it
        from corejax.wire.codec import ProtocolError

        try:
            m.Ended(frame.payload.get("ended"))
        except ValueError:
            raise ProtocolError("an ENDED frame with an unknown reason") from None
        m.clean(frame.payload.get("message", ""))
    elif frame.kind == Kind.RESULT:
        m.read_result(request_kind, frame.payload)


def _request(data: bytes) -> None:
    from corejax.server import schema

    body = schema.parse_body(data)
    if "input" in body:
        schema.embedding_inputs(body)
    else:
        schema.generation_request(body, chat="messages" in body, max_tokens_limit=256)


def _allowed(target: str) -> tuple[type[BaseException], ...]:
    from corejax.errors import CorejaxError

    if target == "frames":  # what the client's reader turns into "the worker broke the protocol"
        from corejax.wire.codec import ProtocolError

        return CorejaxError, ProtocolError
    if target == "request":
        from corejax.server.schema import ApiError

        return (ApiError,)
    return (CorejaxError,)


_MODULES = {"gguf": ["corejax.loading.gguf", "corejax.loading.ggml_quants"],
            "safetensors": ["corejax.loading.loader", "corejax.loading.convert"],
            "config": ["corejax.types.config", "corejax.loading.encoder"],
            "tokenizer": ["corejax.tokenizer.files", "corejax.tokenizer.base", "corejax.tokenizer.gguf"],
            "template": ["corejax.tokenizer.chat", "jinja2"],
            "frames": ["corejax.wire.protocol", "corejax.wire.codec", "corejax.wire.messages"],
            "request": ["corejax.server.schema", "corejax.serving.structured"]}
_SEEDS = {"gguf": _seed_gguf, "safetensors": _seed_safetensors, "config": _seed_config,
          "tokenizer": _seed_tokenizer, "template": _seed_template, "frames": _seed_frames,
          "request": _seed_request}
_RUN = {"gguf": _gguf, "safetensors": _safetensors, "config": _config, "tokenizer": _tokenizer,
        "template": _template, "frames": _frames, "request": _request}


def replay(target: str, data: bytes) -> None:
    """Runs one input (tests/test_fuzz.py's regression replay): returns, or raises an allowed corejax error."""
    try:
        _RUN[target](data)
    except _allowed(target):
        pass


# ----------------------------------------------------------------------------------------------- one target


def _child(target: str, runs: int, timeout_s: int, rss_mb: int, max_len: int) -> None:
    """This process fuzzes `target`: libFuzzer's own output on stderr, our summary as JSON on the last line."""
    import importlib

    import atheris

    with atheris.instrument_imports(include=_MODULES[target]):
        for name in _MODULES[target]:
            importlib.import_module(name)
    allowed = _allowed(target)
    run = _RUN[target]
    stats = {"inputs": 0, "slowest_s": 0.0, "allowed_errors": 0}

    side = OUT / "fuzz" / f"{target}.stats.json"  # libFuzzer ends the process with C's exit: no atexit of ours

    def one(data: bytes) -> None:
        t0 = time.perf_counter()
        try:
            run(data)
        except allowed:
            stats["allowed_errors"] += 1
        finally:
            stats["inputs"] += 1
            took = time.perf_counter() - t0
            if took > stats["slowest_s"] or stats["inputs"] % 500 == 0:
                stats["slowest_s"] = max(stats["slowest_s"], took)
                side.write_text(json.dumps(stats))

    corpus = Path(tempfile.mkdtemp(prefix=f"corejax-fuzz-{target}-"))
    seeds = _SEEDS[target]()
    for i, seed in enumerate(seeds if isinstance(seeds, list) else [seeds]):
        (corpus / f"seed-{i}").write_bytes(seed)
    artifacts = OUT / "fuzz" / target
    artifacts.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], str(corpus), f"-runs={runs}", f"-timeout={timeout_s}", f"-rss_limit_mb={rss_mb}",
            f"-max_len={max_len}", f"-artifact_prefix={artifacts}/", "-print_final_stats=1"]
    side.parent.mkdir(parents=True, exist_ok=True)
    side.write_text(json.dumps(stats))
    mutator = json_mutator(MUTATORS[target]) if target in MUTATORS else frame_mutator() if target == "frames" \
        else None
    atheris.Setup(args, one, custom_mutator=mutator)
    atheris.Fuzz()


def fuzz(target: str, runs: int, timeout_s: int, rss_mb: int, max_len: int) -> dict:
    """Runs one target in a child process; returns its row."""
    cmd = [sys.executable, __file__, "--child", target, "--runs", str(runs), "--timeout-s", str(timeout_s),
           "--rss-mb", str(rss_mb), "--max-len", str(max_len)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    side = OUT / "fuzz" / f"{target}.stats.json"
    summary = json.loads(side.read_text()) if side.exists() else {}
    executed = re.findall(r"stat::number_of_executed_units: (\d+)", log)
    rss = [int(r) for r in re.findall(r"rss: (\d+)Mb", log) + re.findall(r"stat::peak_rss_mb: +(\d+)", log)]
    cov = [int(c) for c in re.findall(r"\bcov: (\d+)", log)]
    crashes = re.findall(r"Test unit written to (\S+)", log)
    row = {"target": target, "inputs": int(executed[-1]) if executed else summary.get("inputs", 0),
           "coverage": max(cov) if cov else 0, "crashes": len(crashes), "crash_files": crashes,
           "allowed_errors": summary.get("allowed_errors", 0), "slowest_s": summary.get("slowest_s"),
           "peak_rss_mb": max(rss) if rss else None, "wall_s": wall, "exit": proc.returncode}
    if crashes or proc.returncode != 0:
        row["log_tail"] = log[-4000:]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    ap.add_argument("--runs", type=int, default=10_000, help="inputs per target")
    ap.add_argument("--timeout-s", type=int, default=10, help="an input running longer is a crash (a hang)")
    ap.add_argument("--rss-mb", type=int, default=2048, help="a process growing past this is a crash")
    ap.add_argument("--max-len", type=int, default=4096, help="the longest input libFuzzer makes")
    ap.add_argument("--json", default=str(OUT / "fuzz.json"))
    ap.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.runs, args.timeout_s, args.rss_mb, args.max_len)
        return 0
    rows = []
    print(f"{'target':<12} {'inputs':>8} {'coverage':>9} {'crashes':>8} {'slowest':>9} {'peak RSS':>9} {'wall':>7}")
    for target in args.targets:
        row = fuzz(target, args.runs, args.timeout_s, args.rss_mb, args.max_len)
        rows.append(row)
        slow = f"{row['slowest_s'] * 1000:.1f} ms" if row["slowest_s"] is not None else "-"
        rss = f"{row['peak_rss_mb']:.0f} MB" if row["peak_rss_mb"] is not None else "-"
        print(f"{target:<12} {row['inputs']:>8} {row['coverage']:>9} {row['crashes']:>8} {slow:>9} {rss:>9} "
              f"{row['wall_s']:>6.0f}s", flush=True)
        for f in row["crash_files"]:
            print(f"  crash: {f}")
        if row["exit"] != 0 and not row["crash_files"]:
            print("  the fuzzer failed:\n" + row.get("log_tail", ""))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"runs": args.runs, "targets": rows}, indent=1))
    print(f"wrote {args.json}")
    return 1 if any(r["crashes"] or r["exit"] != 0 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
