"""`corejax bench`: the record schema, regression flagging, the fingerprint, skips, and a tiny end-to-end run."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest

from corejax.bench import compare, metric, new_record, validate
from corejax.bench.child import PeerMissing, run_child
from corejax.bench.machine import fingerprint, memory_bandwidth
from corejax.bench.record import load_record, regressions, save_record
from corejax.bench.schema import SCHEMA
from corejax.cli import main
from references import require
from tiny_model import write_tiny_llama


@pytest.fixture(scope="module")
def fp() -> dict:
    return fingerprint()


def synthetic(fp: dict, scale: float = 1.0) -> dict:
    """A record whose throughputs are divided by `scale` and whose latencies are multiplied by it."""
    record = new_record("corejax bench --suite generation", {"suites": ["generation"], "model": "m", "reps": 3,
                                                             "quick": False}, fp)
    record["runtimes"]["corejax"] = {"generation": {"weights": "f32"}}
    for runtime, base in (("corejax", 30.0), ("llama.cpp", 80.0)):
        for case in ("prompt=32", "prompt=128"):
            record["results"].append(metric("generation", case, runtime, "decode_tok_s",
                                            [base / scale * f for f in (0.99, 1.0, 1.01)], "tok/s"))
            record["results"].append(metric("generation", case, runtime, "ttft_warm_s",
                                            [0.2 * scale * f for f in (0.98, 1.0, 1.03)], "s", "lower"))
    record["skipped"].append({"suite": "generation", "runtime": "transformers", "reason": "not installed"})
    return record


def test_record_matches_its_schema(fp):
    record = synthetic(fp)
    assert validate(record) == []
    assert validate(json.loads(json.dumps(record))) == []


def test_schema_violations_are_reported(fp):
    record = synthetic(fp)
    del record["fingerprint"]["cpu"]
    record["results"][0]["better"] = "sideways"
    record["results"][1]["samples"] = []
    record["surprise"] = 1
    errors = "\n".join(validate(record))
    assert "missing required 'cpu'" in errors
    assert "'sideways' is not one of" in errors
    assert "fewer than 1 items" in errors
    assert "unexpected property 'surprise'" in errors


def test_jsonschema_agrees_with_the_validator(fp):
    jsonschema = require("jsonschema")
    record = synthetic(fp)
    jsonschema.validate(record, SCHEMA)
    record["results"][0]["n"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(record, SCHEMA)
    assert validate(record)


def test_fingerprint_has_every_field(fp):
    for key in SCHEMA["properties"]["fingerprint"]["required"]:
        assert key in fp, key
    assert fp["cpu"] and fp["cores"] >= fp["usable_cores"] >= 1
    assert fp["jax"] and fp["backend"] == "cpu" and fp["devices"]
    assert isinstance(fp["cpu_flags"], list) and "llama_cpp_python" in fp["packages"]


def test_compare_flags_a_slowed_run_and_not_an_identical_one(fp):
    base = synthetic(fp)
    same = compare(base, copy.deepcopy(base))
    assert {r["status"] for r in same} == {"same"} and not regressions(same)

    slowed = compare(base, synthetic(fp, scale=1.5))
    assert len(slowed) == 8 and {r["status"] for r in slowed} == {"regression"}
    decode = next(r for r in slowed if r["metric"] == "decode_tok_s")
    assert decode["change"] == pytest.approx(1 / 1.5 - 1)

    faster = compare(base, synthetic(fp, scale=0.5))
    assert {r["status"] for r in faster} == {"improvement"}


def test_compare_tolerates_noise_and_reports_new_and_missing(fp):
    base = synthetic(fp)
    slightly = synthetic(fp, scale=1.03)  # 3% slower: inside the 5% threshold
    assert not regressions(compare(base, slightly))
    noisy_old = metric("ipc", "decode", "corejax", "caller_tok_s", [20.0, 30.0, 40.0], "tok/s")
    noisy_new = metric("ipc", "decode", "corejax", "caller_tok_s", [18.0, 27.0, 36.0], "tok/s")  # -10%, spread ±33%
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    a["results"].append(noisy_old)
    b["results"].append(noisy_new)
    b["results"] = [e for e in b["results"] if e["runtime"] != "llama.cpp"]
    rows = {(r["runtime"], r["metric"], r["case"]): r for r in compare(a, b)}
    assert rows[("corejax", "caller_tok_s", "decode")]["status"] == "same"
    assert rows[("llama.cpp", "decode_tok_s", "prompt=32")]["status"] == "missing"
    assert {r["status"] for r in compare(b, a) if r["runtime"] == "llama.cpp"} == {"new"}


def test_saved_baselines_round_trip(fp, tmp_path):
    path = save_record(synthetic(fp), str(tmp_path / "base.json"))
    assert load_record(str(path)) == json.loads(path.read_text())
    bad = synthetic(fp)
    bad["results"][0]["median"] = "fast"
    with pytest.raises(ValueError, match="schema"):
        save_record(bad, str(tmp_path / "bad.json"))


def test_memory_bandwidth_is_measured():
    bw = memory_bandwidth(mib=16, reps=2, threads=2)
    assert len(bw["read"]) == 2 and all(x > 0.1 for x in bw["read"] + bw["copy"])


def test_a_peer_that_cannot_run_is_skipped_with_its_reason(tmp_path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))  # a header and nothing else: no runtime can load it
    spec = {"model": str(gguf), "prompts": [{"tokens": 2, "text": "The", "ids": [1, 2]}], "decode_tokens": 2,
            "reps": 1, "threads": 1, "weights": "f32", "sandbox": False, "file_weight_bytes": 1}
    # In a fresh process, as the bench runs it; without llama-cpp-python the reason says that instead.
    with pytest.raises(PeerMissing, match="llama") as e:
        run_child("corejax.bench.generation:run_llama_cpp", spec)
    assert e.value.status in ("missing", "unsupported")


def test_micro_cases_run(tmp_path):
    from corejax.bench.micro import cases, time_per_call
    from corejax.bench.text import corejax_tokenizer
    from corejax.hub import ModelSource

    gguf = write_tiny_llama(tmp_path / "tiny.gguf")
    tok = corejax_tokenizer(ModelSource("tiny", "gguf", gguf))
    found = cases(tok)
    assert any(k.startswith("protocol") for k in found) and any(k.startswith("page allocator") for k in found)
    assert any(k.startswith("sampler") for k in found) and any(k.startswith("tokenizer") for k in found)
    for fn in found.values():
        fn()
    assert all(x > 0 for x in time_per_call(lambda: sum(range(100)), batches=2, min_batch_s=0.001))


def test_tokenizer_suite_end_to_end_then_compare(tmp_path, capsys):
    gguf = write_tiny_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "run.json"
    args = ["bench", "--suite", "tokenizer", "--model", str(gguf), "--quick", "--runtimes", "corejax",
            "hf-tokenizers", "--json", str(out), "--no-progress", "--save", str(tmp_path / "base.json")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "encode_mb_s" in text and "corejax/hf-tokenizers" in text
    record = json.loads(out.read_text())
    assert validate(record) == []
    assert (tmp_path / "bench_tokenizer.png").exists()
    runtimes = {e["runtime"] for e in record["results"] if e["suite"] == "tokenizer"}
    assert "corejax" in runtimes
    if "hf-tokenizers" in runtimes:  # transformers converts the tiny vocabulary; both must agree on every doc
        agreement = next(e for e in record["results"] if e["metric"] == "agreement")
        assert agreement["median"] == 1.0

    assert main(["bench", "--input", str(out), "--compare", str(tmp_path / "base.json"), "--no-progress"]) == 0
    assert "REGRESSION" not in capsys.readouterr().out

    slowed = copy.deepcopy(record)
    for e in slowed["results"]:
        if e["metric"] == "encode_mb_s":
            e["samples"] = [x / 2 for x in e["samples"]]
            e["median"], e["min"], e["max"] = e["median"] / 2, e["min"] / 2, e["max"] / 2
    (tmp_path / "slow.json").write_text(json.dumps(slowed))
    assert main(["bench", "--input", str(tmp_path / "slow.json"), "--compare", str(tmp_path / "base.json")]) == 1
    assert "REGRESSION" in capsys.readouterr().out


def test_generation_suite_end_to_end_on_the_tiny_model(tmp_path, capsys):
    gguf = write_tiny_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "gen.json"
    assert main(["bench", "--model", str(gguf), "--runtimes", "corejax", "--no-sandbox", "--reps", "2",
                 "--prompt-lengths", "2", "5", "--decode-tokens", "4", "--json", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert validate(record) == [] and record["command"].startswith(("corejax", "python"))
    label = "corejax (in-process)"
    got = {(e["case"], e["metric"]): e for e in record["results"] if e["runtime"] == label}
    cases = {c for c, _ in got if c.startswith("prompt=")}
    assert cases and len(cases) <= 2
    for case in cases:
        for name in ("prefill_tok_s", "decode_tok_s", "ttft_warm_s", "decode_roofline_fraction"):
            assert got[(case, name)]["n"] == 2 and got[(case, name)]["median"] > 0
    assert got[("memory", "peak_rss_mb")]["median"] > 0 and got[("start", "ttft_cold_s")]["median"] > 0
    assert any(e["suite"] == "machine" and e["metric"] == "read_gb_s" for e in record["results"])
    assert record["runtimes"][label]["generation"]["sandbox"] is False
    assert "prompt=" in capsys.readouterr().out


def test_markdown_page_holds_command_fingerprint_and_ratios(fp):
    from corejax.bench.report import markdown

    page = markdown(synthetic(fp), {"generation": "results/bench_generation.png"})
    assert "`corejax bench --suite generation`" in page and fp["cpu"] in page
    assert "| case | metric | unit | corejax | llama.cpp | corejax/llama.cpp |" in page
    assert "| prompt=32 | decode_tok_s | tok/s | 30.0 [29.7-30.3] | 80.0 [79.2-80.8] | 0.38x |" in page
    assert "![generation](results/bench_generation.png)" in page and "skipped transformers" in page


@pytest.mark.parametrize("module", ["llama_cpp", "transformers"])
def test_a_missing_peer_is_skipped_with_a_one_line_reason(module, monkeypatch, tmp_path):
    import sys

    from corejax.bench.generation import run_llama_cpp, run_transformers
    from corejax.bench.tokenizer import hf_tokenizer, llama_cpp_tokenizer
    from corejax.hub import ModelSource

    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError, as when not installed
    source = ModelSource("tiny", "gguf", write_tiny_llama(tmp_path / "tiny.gguf"))
    spec = {"model": str(source.path), "prompts": [{"tokens": 2, "text": "The", "ids": [1, 2]}],
            "decode_tokens": 2, "reps": 1, "threads": 1, "file_weight_bytes": 1}
    runner, tokenizer = ((run_llama_cpp, llama_cpp_tokenizer) if module == "llama_cpp"
                         else (run_transformers, hf_tokenizer))
    for call in (lambda: runner(spec, lambda: None), lambda: tokenizer(source)):
        with pytest.raises(PeerMissing) as e:
            call()
        assert "\n" not in str(e.value) and ("not installed" in str(e.value) or "needs transformers" in str(e.value))


def test_bad_options_get_a_sentence_not_a_traceback(capsys):
    assert main(["bench", "--reps", "0"]) == 1
    assert "--reps must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--input", "/nonexistent/record.json"]) == 1
    assert "no bench record" in capsys.readouterr().err


# --- peers that crash, hang or fail to import: a real child process each, through a fake llama_cpp package ----

def fake_llama_cpp(tmp_path: Path, monkeypatch, body: str) -> Path:
    """A `llama_cpp` package that the bench's child processes import instead of any real one (PYTHONPATH)."""
    folder = tmp_path / "fake_peer"
    (folder / "llama_cpp").mkdir(parents=True)
    (folder / "llama_cpp" / "__init__.py").write_text(body)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    return folder


def bench_generation(tmp_path: Path, capsys, *extra: str) -> tuple[int, dict, str]:
    """The cheapest generation run: the tiny model, one prompt of 2 tokens, 1 rep, 2 decoded tokens."""
    gguf = write_tiny_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "gen.json"
    rc = main(["bench", "--model", str(gguf), "--quick", "--prompt-lengths", "2", "--decode-tokens", "2",
               "--json", str(out), "--plots", str(tmp_path / "plots"), "--no-progress", *extra])
    record = json.loads(out.read_text())
    assert validate(record) == []
    jsonschema = require("jsonschema")
    jsonschema.validate(record, SCHEMA)
    return rc, record, capsys.readouterr().out


def skipped(record: dict, runtime: str) -> dict:
    (entry,) = [s for s in record["skipped"] if s["runtime"] == runtime]
    return entry


SEGFAULT_ON_FIRST_PROMPT = """
import os, signal
__version__ = "0-fake"
class Llama:
    def __init__(self, *args, **kwargs):
        pass
    def reset(self):
        pass
    def eval(self, tokens):
        os.kill(os.getpid(), signal.SIGSEGV)  # as ggml-cpu's default build does on the first prompt here
"""


def test_a_crashing_peer_gets_a_row_with_the_signal_and_a_build_that_runs(tmp_path, monkeypatch, capsys):
    fake_llama_cpp(tmp_path, monkeypatch, SEGFAULT_ON_FIRST_PROMPT)
    rc, record, text = bench_generation(tmp_path, capsys, "--runtimes", "corejax", "llama.cpp", "--no-sandbox")
    assert rc == 0  # a peer's crash is not corejax's failure
    label = "corejax (in-process)"
    assert {e["metric"] for e in record["results"] if e["runtime"] == label} >= {"prefill_tok_s", "decode_tok_s"}
    assert not [e for e in record["results"] if e["runtime"] == "llama.cpp"]
    crash = skipped(record, "llama.cpp")
    assert crash["status"] == "crashed" and crash["signal"] == "SIGSEGV" and crash["returncode"] == -11
    assert crash["reason"].startswith("killed by SIGSEGV (segmentation fault)")
    assert "Segmentation fault" in crash["output_tail"] and " in eval" in crash["output_tail"]  # faulthandler's
    advice = crash["advice"]
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF ' in advice and "-DGGML_AMX_TILE=OFF" in advice
    assert "pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python" in advice
    assert "== not measured ==" in text and "generation  llama.cpp  crashed  killed by SIGSEGV" in text
    assert "what to do about llama.cpp (generation)" in text and "\n  CMAKE_ARGS=" in text
    assert (tmp_path / "plots" / "bench_generation.png").exists()


def test_a_hung_peer_is_killed_at_the_timeout_with_what_it_started(tmp_path, monkeypatch, capsys):
    pids = tmp_path / "pids"
    fake_llama_cpp(tmp_path, monkeypatch, f"""
import os, subprocess, sys, time
class Llama:
    def __init__(self, *args, **kwargs):
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{helper.pid}}")
        print("fake llama.cpp: hanging", file=sys.stderr, flush=True)
        time.sleep(600)
""")
    t0 = time.monotonic()
    rc, record, text = bench_generation(tmp_path, capsys, "--runtimes", "llama.cpp", "--peer-timeout", "2")
    assert rc == 0 and time.monotonic() - t0 < 60
    hung = skipped(record, "llama.cpp")
    assert hung["status"] == "timeout" and hung["reason"].startswith("made no progress for 2 s and was killed")
    assert "--peer-timeout" in hung["advice"] and "CMAKE_ARGS=" in hung["advice"]
    assert "generation  llama.cpp  timeout" in text and record["config"]["peer_timeout_s"] == 2
    if pids.exists():  # it got as far as the fake's constructor before the timeout (it does unless very loaded)
        assert "fake llama.cpp: hanging" in hung["output_tail"]
        assert "in __init__" in hung["output_tail"]  # where it hung: its stack, dumped before the kill
        deadline = time.monotonic() + 5
        while any(_alive(int(p)) for p in pids.read_text().split()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(int(p)) for p in pids.read_text().split())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie is dead, awaiting a reaper that may not reap here


def test_a_peer_whose_import_fails_is_failed_not_missing(tmp_path, monkeypatch, capsys):
    fake_llama_cpp(tmp_path, monkeypatch,
                   'raise ImportError("libllama.so: undefined symbol: ggml_backend_cpu_init")\n')
    rc, record, text = bench_generation(tmp_path, capsys, "--runtimes", "llama.cpp")
    assert rc == 0
    broken = skipped(record, "llama.cpp")
    assert broken["status"] == "failed" and "installed but `import llama_cpp` fails" in broken["reason"]
    assert "undefined symbol" in broken["reason"] and "CMAKE_ARGS=" in broken["advice"]
    assert "generation  llama.cpp  failed" in text


def test_corejax_crashing_fails_the_run_where_a_peer_crashing_does_not(tmp_path, monkeypatch, fp):
    import argparse

    from corejax.bench.command import Context

    fake_llama_cpp(tmp_path, monkeypatch, SEGFAULT_ON_FIRST_PROMPT)
    spec = {"model": str(tmp_path / "x.gguf"), "prompts": [{"tokens": 2, "text": "The", "ids": [1, 2]}],
            "decode_tokens": 2, "reps": 1, "threads": 1, "file_weight_bytes": 1}
    args = argparse.Namespace(quick=True, reps=None, model="m", embedding_model="e", prompt_lengths=None,
                              decode_tokens=None, threads=1, weights=None, sandbox=True, peer_timeout=60.0,
                              runtimes=None)

    class Bar:
        def write(self, text: str) -> None:
            pass

        def update(self, n: int) -> None:
            pass

        def set_postfix_str(self, text: str) -> None:
            pass

    # The same crashing child, under a peer's label and under corejax's: only corejax's fails the run.
    for label, fails in (("llama.cpp", False), ("corejax", True)):
        ctx = Context(args, new_record("corejax bench", {}, fp), Bar())
        assert ctx.child("corejax.bench.generation:run_llama_cpp", spec, "generation", label, steps=2) is None
        assert ctx.failed is fails and ctx.record["skipped"][0]["status"] == "crashed"
        assert ("corejax failure" in ctx.record["skipped"][0]["advice"]) is fails


def test_llama_cpp_build_flags_follow_the_cpu():
    from corejax.bench.advice import llama_cpp_cmake_args, llama_cpp_rebuild_command

    zen1 = {"sse4_2", "avx", "avx2", "bmi2", "fma", "f16c"}  # ../shared/PERF-NOTES.md's AVX2-only machine
    args = llama_cpp_cmake_args(zen1, "x86_64").split()
    assert args[0] == "-DGGML_NATIVE=OFF"
    assert {"-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_AVX512=OFF",
            "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX_VNNI=OFF", "-DGGML_AMX_INT8=OFF"} <= set(args)
    sapphire = zen1 | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vbmi", "avx512_vnni",
                       "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}
    args = set(llama_cpp_cmake_args(sapphire, "x86_64").split())
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
            "-DGGML_AVX_VNNI=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= args
    assert "-DGGML_AVX512_VNNI=OFF" in llama_cpp_cmake_args(zen1 | {"avx512_vnni"}, "x86_64")  # needs AVX-512
    assert llama_cpp_cmake_args(sapphire, "aarch64") == "-DGGML_NATIVE=OFF"
    assert llama_cpp_rebuild_command(zen1, "0.3.36", "x86_64").endswith(
        "pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python==0.3.36")


def test_an_in_process_peer_that_raises_gets_a_failed_row_not_a_failed_suite(tmp_path, monkeypatch, capsys):
    transformers = require("transformers")

    def broken(*args, **kwargs):  # as transformers importing a shadowed or half-installed dependency does
        raise ImportError("cannot import name 'CUDAProperties' from 'kernels'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    gguf = write_tiny_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "tok.json"
    assert main(["bench", "--suite", "tokenizer", "--model", str(gguf), "--quick", "--runtimes", "corejax",
                 "hf-tokenizers", "--json", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert validate(record) == [] and any(e["runtime"] == "corejax" for e in record["results"])
    row = skipped(record, "hf-tokenizers")
    assert row["status"] == "failed" and row["reason"] == (
        "raised ImportError: cannot import name 'CUDAProperties' from 'kernels'")
    assert "in broken" in row["output_tail"] and "--runtimes corejax llama.cpp" in row["advice"]
    assert "tokenizer  hf-tokenizers  failed  raised ImportError" in capsys.readouterr().out


def _result(record: dict, suite: str, case: str, runtime: str, name: str) -> dict:
    (entry,) = [r for r in record["results"] if (r["suite"], r["case"], r["runtime"], r["metric"]) ==
                (suite, case, runtime, name)]
    return entry


def test_startup_suite_measures_a_new_process_kept_and_not(tmp_path):
    """Fresh processes with the model kept and with a worker of their own: both measured, and the kept path's
    client imported no JAX (the record says so, from inside the script)."""
    gguf = write_tiny_llama(tmp_path / "tiny.gguf", context=128)
    out = tmp_path / "startup.json"
    assert main(["bench", "--suite", "startup", "--model", str(gguf), "--quick", "--json", str(out),
                 "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert validate(record) == [] and not record["skipped"]
    for runtime in ("corejax (kept)", "corejax (own worker)"):
        assert _result(record, "startup", "corejax generate -n 16", runtime, "wall_s")["median"] > 0
        assert _result(record, "startup", "script: Session + stream 16", runtime, "first_piece_s")["median"] > 0
        assert 10 < _result(record, "startup", "corejax generate -n 16", runtime, "client_peak_rss_mb")["median"] < 400
    assert _result(record, "startup", "script: Session + stream 16", "corejax (kept)",
                  "client_imported_jax")["samples"] == [0]
    from corejax.client import keepalive

    assert not [s for s in keepalive.running() if s["path"] == str(gguf)]  # the suite stops what it kept
