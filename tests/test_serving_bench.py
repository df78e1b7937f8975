"""benchmarks/serving.py's bookkeeping (issue 38): llama-batched-bench's table parsed, a burst's figures and the
goals worked out from known timings. The servers themselves run in `python benchmarks/serving.py --quick`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import serving  # benchmarks/ is not a package: imported from its folder
import serving_llama

# llama-batched-bench's output as it prints it (tools/batched-bench/batched-bench.cpp), log lines around it
TABLE = """main: n_kv_max = 8256, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, n_threads = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |     16 |    1 |    144 |    0.250 |   512.00 |    0.200 |    80.00 |    0.450 |   320.00 |
|   128 |     16 |    2 |    288 |    0.500 |   512.00 |    0.250 |   128.00 |    0.750 |   384.00 |

llama_perf_context_print:        load time =      61.19 ms
"""


def test_batched_bench_table_is_parsed_by_batch_size():
    rows = serving_llama.parse_table(TABLE)
    assert sorted(rows) == [1, 2]
    two = rows[2]
    assert two["ttft_s"] == 0.5 and two["decode_tok_s"] == 128.0
    assert two["aggregate_tok_s"] == pytest.approx(2 * 16 / 0.75)  # generated tokens over the whole time
    assert two["per_stream_tok_s"] == pytest.approx(16 / 0.75)


def test_a_burst_gives_aggregate_ttft_and_inter_token_gaps():
    # two streams submitted at t=0: first chunks at 0.5 and 1.0 s, then a chunk every 0.1 s / 0.2 s
    a = {"times": [0.0, 0.5, 0.6, 0.7], "tokens": 3, "prompt_tokens": 100}
    b = {"times": [0.0, 1.0, 1.2, 1.4], "tokens": 3, "prompt_tokens": 102}
    s = serving.summarize([[a, b]])
    assert s["aggregate_tok_s"] == pytest.approx(6 / 1.4)
    assert s["per_stream_tok_s"] == pytest.approx((3 / 0.7 + 3 / 1.4) / 2)
    assert s["ttft_p50_s"] == pytest.approx(0.75) and s["ttft_p95_s"] == pytest.approx(0.975)
    assert s["itl_p95_s"] == pytest.approx(0.2)  # the gaps 0.1, 0.1, 0.2, 0.2; submit-to-first is TTFT's
    assert s["tok_per_chunk"] == 1.0 and s["prompt_tokens"] == 101


def _level(agg: float, itl: float) -> dict:
    return {"aggregate_tok_s": agg, "itl_p95_s": itl}


def test_goals_flag_what_is_missed():
    record = {"runtimes": {
        "corejax serve": {"1": _level(100, 0.01), "2": _level(90, 0.02), "8": _level(600, 0.03)},
        "llama-server": {"1": _level(80, 0.01), "2": _level(80, 0.01), "8": _level(400, 0.04)}}}
    got = {(g["goal"], g["runtime"]): g for g in serving.goals(record)}
    assert got[("aggregate at 8 streams >= 5x one stream", "corejax serve")]["ok"] is True
    assert got[("aggregate at 8 streams >= 5x one stream", "llama-server")]["ok"] is True
    assert got[("2 streams never below 1x", "corejax serve")]["ok"] is False
    assert got[("corejax serve aggregate >= 1.2x llama-server's at every stream count", "corejax serve")][
        "ok"] is False  # 1.25x, 1.12x, 1.5x
    itl = got[("corejax serve inter-token P95 no worse than llama-server's", "corejax serve")]
    assert itl["ok"] is False and "2:2.00x" in itl["detail"]


def test_llama_programs_are_found_in_a_build_folder(tmp_path):
    assert serving_llama.programs_in(tmp_path) is None
    (tmp_path / "bin").mkdir()
    for name in serving_llama.PROGRAMS:
        (tmp_path / "bin" / name).write_text("#!/bin/sh\n")
        (tmp_path / "bin" / name).chmod(0o755)
    assert serving_llama.programs_in(tmp_path) == {n: tmp_path / "bin" / n for n in serving_llama.PROGRAMS}
    with pytest.raises(SystemExit, match="no llama-server and llama-batched-bench"):
        serving_llama.locate(str(tmp_path / "nothing"))
