"""`corejax bench`: the record schema, regression flagging, the fingerprint, skips, and a tiny end-to-end run."""

from __future__ import annotations

import copy
import json

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
    with pytest.raises(PeerMissing, match="llama"):
        run_child("corejax.bench.generation:run_llama_cpp", spec)


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
