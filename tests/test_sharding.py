"""Tensor-parallel models (corejax/engine/sharding.py) on forced host devices: the same greedy tokens and logits as
one device, the weights split (per-device bytes), the KV pages split by KV head where the heads divide."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from corejax.types.config import EngineConfig
from corejax.errors import InvalidParameterError
from tiny_model import write_tiny_llama

HERE = Path(__file__).parent


def run_sharded(name: str, path: Path, counts: str = "1,2,4", sandboxed: bool = False) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(HERE / "sharded_run.py"), name, str(path), counts,
                          "1" if sandboxed else "0"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(result: dict) -> None:
    """Both real models have head counts N = 2 and 4 do not both divide: their MLPs and LM heads split, and
    attention (Gemma's query heads excepted) stays replicated; the tiny model checks the full split."""
    runs = {int(n): r for n, r in result["runs"].items()}
    one = runs[1]
    assert result["devices_seen"] == 4
    for n in (2, 4):
        r = runs[n]
        assert r["tokens"] == one["tokens"]
        # Same function, sums in another order (each device adds its share, then an all-reduce): float32
        # rounding only, relative to the logits' scale.
        assert r["max_abs_logit_diff"] <= 1e-5 * max(1.0, one["max_abs_logit"]) * 10, r
        assert not r["native_kernels"]  # the single-device native kernels are off in a multi-device process
        assert r["weight_bytes_per_device"] < one["weight_bytes_per_device"] * (0.62 if n == 2 else 0.42)


def test_tiny_model_splits_everything(tmp_path):
    # 4 heads, 2 KV heads: at N = 2 everything splits, at N = 4 the KV heads do not divide (attention replicated).
    path = write_tiny_llama(tmp_path / "tiny.gguf", context=128, heads=4, kv_heads=2, hidden=64, ffn=128,
                            quantize=None)
    result = run_sharded("tiny", path, "1,2")
    runs = {int(n): r for n, r in result["runs"].items()}
    assert runs[2]["tokens"] == runs[1]["tokens"]
    assert runs[2]["max_abs_logit_diff"] <= 1e-5 * max(1.0, runs[1]["max_abs_logit"]) * 10
    assert runs[2]["layer_bytes_per_device"] <= runs[1]["layer_bytes_per_device"] / 2 * 1.02  # norms replicated
    assert runs[2]["weight_bytes_per_device"] < runs[1]["weight_bytes_per_device"] * 0.6  # its odd vocabulary too
    assert runs[2]["kv_bytes_per_device"] * 2 == runs[1]["kv_bytes_per_device"] and runs[2]["kv_devices"] == 2


def test_devices_are_validated_and_counted():
    with pytest.raises(InvalidParameterError, match="devices"):
        EngineConfig(devices=0)
    from corejax.engine.sharding import make_mesh

    with pytest.raises(InvalidParameterError, match="xla_force_host_platform_device_count=64"):
        make_mesh(64)


@pytest.mark.slow
def test_smollm2_sharded_equals_one_device(smollm2_gguf):
    result = run_sharded("smollm2", smollm2_gguf, sandboxed=True)  # 9 heads, 3 KV heads: MLP + LM head split
    check(result)
    assert result["sandboxed_tokens"] == result["runs"]["1"]["tokens"]


@pytest.mark.slow
def test_gemma3_sharded_equals_one_device(gemma3_gguf):
    check(run_sharded("gemma3", gemma3_gguf))  # its 4 query heads split, its one KV head replicated


POOL_COPY_SCRIPT = """
import re, sys
from pathlib import Path
from corejax.types.config import EngineConfig
from corejax.hub import ModelSource
from corejax.types.options import SamplingParams
from corejax.worker.start import open_runtime
rt = open_runtime(ModelSource("tiny", "gguf", Path(sys.argv[1])), progress=False,
             engine=EngineConfig(devices=2, kv_cache_tokens=1024))
*_, last = rt.stream("the cat sat", None, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
pool = rt.runner.cache.k_pages
print("pool", "f32[" + ",".join(map(str, pool.shape)) + "]", len(pool.sharding.device_set))
"""


def test_partitioned_decode_updates_the_pool_in_place(tmp_path):
    """The 2-device decode program writes the KV pool in place: no whole-pool copy in the optimized HLO. Without
    engine.py's CACHE_WRITER_OPTIONS, XLA:CPU copied the pool twice per layer per step (decode 40x slower)."""
    # 4 query heads, 1 KV head: attention and the pool replicated, as for both real models at N = 2 and 4.
    path = write_tiny_llama(tmp_path / "tiny.gguf", context=128, heads=4, kv_heads=1, hidden=64, ffn=128,
                            quantize=None)
    dump = tmp_path / "hlo"
    env = dict(os.environ, COREJAX_NATIVE="0", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
               XLA_FLAGS=f"--xla_force_host_platform_device_count=2 --xla_dump_to={dump} --xla_dump_hlo_as_text "
                         "--xla_dump_hlo_module_re=decode_step")
    out = subprocess.run([sys.executable, "-c", POOL_COPY_SCRIPT, str(path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _, shape, devices = out.stdout.split()[-3:]
    assert devices == "2"
    programs = list(dump.glob("*decode_step*after_optimizations.txt"))
    assert programs, sorted(p.name for p in dump.iterdir())
    for program in programs:
        copies = [line for line in program.read_text().splitlines()
                  if re.search(rf"= {re.escape(shape)}\{{[0-9,]*\}} copy\(", line)]
        assert not copies, f"{program.name} copies the KV pool:\n" + "\n".join(copies[:4])
