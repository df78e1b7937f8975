"""One GPU run for issue 22: Pallas kernels compiled for real, a 1B Llama through the engine beside HF, bandwidth.

The Pallas kernels checked against their references on the device and timed beside lax; a random-weight
Llama-3.2-1B-shaped model through corejax's engine beside HF transformers on the same weights; the device's copy
bandwidth against what decode achieves.

    python benchmarks/gpu.py              # on the GPU machine: at most --budget (300) s, compiles included
    python benchmarks/gpu.py --smoke      # anywhere: tiny shapes, Pallas interpreted, torch on the CPU (~1 min)

Runs from a plain working tree (nothing installed): it registers corejax/ and kernels/ (shipped as
corejax.kernels, pyproject's package-dir) as packages without running corejax/__init__.py, so only the engine's
modules load, not the Session, sandbox or server stack, and gguf-py is not needed. Prints a table and writes
$OUT/gpu.json (and each part's stderr under $OUT/gpu-logs/) when OUT is set, else
benchmarks/results/gpu-<date>.json (a smoke run: benchmarks/out/gpu-smoke.json).

Each part runs in a subprocess under a time limit, and each kernel case or engine compile under a watchdog: a
kernel that crashes or hangs the compiler costs its own case (the device part resumes after it), not the run,
and every error is recorded as text.
Parts, in order of what matters most if time runs short:
- device: versions, copy bandwidth, each Pallas kernel (interpret=False on the GPU) against its reference and
  timed beside the lax implementation;
- engine:xla: the 1B model on XLA ops only (paged attention impl="lax"): prefill 512 tokens, greedy decode at
  batch 1 and 8; it also hands its weights and tokens to the hf part;
- hf: LlamaForCausalLM (bf16, eager, a manual greedy loop over the default dynamic cache) on the same weights:
  the same timings, and corejax's greedy tokens checked teacher-forced against HF in bf16 and float32;
- engine:pallas-decode: decode through the Pallas paged kernel with 128-token tiles, prefill on lax;
- engine:xla-f32: engine:xla with the same weights held as float32. models/layers.py `dense` multiplies float32
  activations by the weights, so bf16 weights are converted, and XLA hoists that convert of every stacked weight
  out of the layer loop (seen in the CPU program): each step may write a float32 copy of all weights;
- engine:shipped: the engine exactly as shipped. Before kernels/paged_attention.py chose per row count (Pallas
  with 128-token tiles up to 64 query rows, lax for prefill chunks), it ran Pallas for every paged call with
  1024-token tiles, and neither compiled on the H200: a 512-token chunk puts 512 x 4 query rows against a
  1024-token tile in one Triton program (over Triton's 2^20-element limit), and decode's tiles exceeded the shared
  memory. Where prefill does not compile, decode is timed over the unfilled cache (the same work).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ---- shapes ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder's sizes and the workload run on it."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    prompt: int  # tokens per prompt (one prefill chunk)
    new_tokens: int  # greedy decode steps
    batch: int  # rows of the batched decode


# Llama-3.2-1B (config.json of meta-llama/Llama-3.2-1B): tied embeddings, RoPE base 500000 with llama3 scaling.
LLAMA_1B = ModelShape(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, ffn=8192,
                      prompt=512, new_tokens=128, batch=8)
SMOKE_MODEL = ModelShape(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128,
                         prompt=48, new_tokens=8, batch=2)
ROPE_THETA = 500000.0
ROPE_LLAMA3 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position": 8192}
MAX_CONTEXT = 131072
PAGE = 16
WEIGHT_STD, EMBED_STD = 0.02, 0.1  # EMBED_STD: logits spread ~4.5, so greedy ties are rare (see the hf part)


@dataclasses.dataclass(frozen=True)
class FlashCase:
    name: str
    b: int
    t: int  # queries, at positions offset .. offset + t - 1
    s: int  # keys, at positions 0 .. s - 1
    n: int
    k: int
    h: int
    window: int
    dtype: str  # "bf16" | "f32"
    block: tuple[int, int] | None  # (block_q, block_k); None = the shipped default
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class PagedCase:
    name: str
    b: int
    t: int  # 1 = decode; more = a prefill chunk whose keys were written first
    n: int
    k: int
    h: int
    context: int  # tokens of page table per row (pages_per_seq · PAGE)
    window: int
    kv: str  # "bf16" (stored as uint16 bits, as the engine does) | "f32" | "int8"
    block_kv: int | None  # None = the shipped default (1024)
    layers: int = 0  # > 0: a stacked [L, K, P, ...] cache read at a traced layer index, as the engine calls it


# The 1B model's attention is N=32, K=8, H=64; H=128 is the 3B/8B head size. Cases that may exceed what one Triton
# program holds (shipped default tiles) come after the ones expected to work, so a crash loses the least.
FLASH_CASES = [
    FlashCase("flash 1k bf16 h64", 1, 1024, 1024, 32, 8, 64, 0, "bf16", (64, 64)),
    FlashCase("flash 1k bf16 h128", 1, 1024, 1024, 32, 8, 128, 0, "bf16", (64, 64)),
    FlashCase("flash 1k bf16 h64 window 256", 1, 1024, 1024, 32, 8, 64, 256, "bf16", (64, 64)),
    FlashCase("flash 1k f32 h64", 1, 1024, 1024, 32, 8, 64, 0, "f32", (64, 64)),
    FlashCase("flash chunk 128@384 of 512 bf16 h64", 2, 128, 512, 32, 8, 64, 0, "bf16", (64, 64), offset=384),
    FlashCase("flash 1k bf16 h64 default tiles", 1, 1024, 1024, 32, 8, 64, 0, "bf16", None),
    FlashCase("flash 1k bf16 h128 default tiles", 1, 1024, 1024, 32, 8, 128, 0, "bf16", None),
]
PAGED_CASES = [
    PagedCase("paged decode b8 1k bf16 h64", 8, 1, 32, 8, 64, 1024, 0, "bf16", 128),
    PagedCase("paged decode b8 1k bf16 h64 layer", 8, 1, 32, 8, 64, 1024, 0, "bf16", 128, layers=2),
    PagedCase("paged decode b8 1k bf16 h64 window 256", 8, 1, 32, 8, 64, 1024, 256, "bf16", 128),
    PagedCase("paged decode b8 1k f32 h128", 8, 1, 32, 8, 128, 1024, 0, "f32", 128),
    PagedCase("paged decode b8 1k int8 h64", 8, 1, 32, 8, 64, 1024, 0, "int8", 128),
    PagedCase("paged decode b1 4k bf16 h64", 1, 1, 32, 8, 64, 4096, 0, "bf16", 128),
    PagedCase("paged chunk t16 bf16 h64", 2, 16, 32, 8, 64, 1024, 0, "bf16", 128),
    PagedCase("paged decode b8 1k bf16 h64 default tiles", 8, 1, 32, 8, 64, 1024, 0, "bf16", None),
    # The engine's prefill chunk with the CPU's tiles: 512 x 4 query rows against 1024-token tiles in one program.
    PagedCase("paged chunk t512 bf16 h64 default tiles", 1, 512, 32, 8, 64, 1024, 0, "bf16", None),
]
TOLERANCE = {"bf16": 2e-2, "f32": 1e-2, "int8": 2e-2}  # of max |ref|; f32 allows TF32 dots (10-bit mantissa)


def smoke_case(case: FlashCase | PagedCase) -> FlashCase | PagedCase:
    """The same case kind at CPU-interpreter sizes."""
    if isinstance(case, FlashCase):
        return dataclasses.replace(case, b=min(case.b, 2), t=min(case.t, 32), s=min(case.s, 64), n=4, k=2,
                                   window=min(case.window, 8), block=(16, 16) if case.block else None,
                                   offset=min(case.offset, 32))
    return dataclasses.replace(case, b=min(case.b, 3), t=min(case.t, 4), n=4, k=2, context=64,
                               window=min(case.window, 8), block_kv=32 if case.block_kv else None)


# ---- running in a child process ----------------------------------------------------------------------------


def import_corejax() -> None:
    """corejax from this checkout (the script runs from a copied working tree, installed or not): its __init__
    maps corejax.kernels to the tree's kernels/ folder."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import corejax  # noqa: F401


def clip(text: str) -> str:
    """An error's text, kept whole up to 4000 characters (MLIR dumps run to megabytes): head and tail."""
    return text if len(text) <= 4000 else text[:3000] + "\n...\n" + text[-1000:]


def headline(text: str, width: int = 90) -> str:
    """The line of an error that says what failed (compiler errors open with "Verification failed:" and the
    like and name the limit a few lines down)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    keys = ("Maximum", "out of resource", "OutOfResources", "shared memory", "exceeds", "not supported",
            "Unsupported", "timed out")
    return next((line for line in lines if any(k in line for k in keys)), lines[0])[:width]


class Record:
    """A part's results, rewritten to its file after every change so a crash or a kill loses nothing done."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}
        self.data.setdefault("errors", [])

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def error(self, where: str, exc: BaseException | str) -> str:
        text = clip(exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}")
        self.data["errors"].append({"where": where, "error": text})
        self.save()
        print(f"  ! {where}: {headline(text, 200)}", flush=True)
        return text

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


@contextlib.contextmanager
def watchdog(record: Record, what: str, seconds: float):
    """Ends the process if `what` runs past `seconds` (a compile that hangs), after recording it; the parent sees
    the exit and carries on. XLA releases the GIL while it compiles, so this thread gets to run."""
    def expire() -> None:
        record.error(what, f"timed out after {seconds:.0f} s (process ended by the watchdog)")
        os._exit(3)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def timed(fn, iters: int) -> tuple[float, float]:
    """-> (seconds of the first call, compile included; mean ms of `iters` calls after it)."""
    import jax

    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return first, (time.perf_counter() - t) / iters * 1e3


# ---- part: device (versions, bandwidth, kernels) -----------------------------------------------------------


def environment() -> dict:
    import jax
    import jaxlib

    device = jax.devices()[0]
    info = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "backend": jax.default_backend(), "device": device.device_kind, "device_count": jax.device_count()}
    with contextlib.suppress(Exception):
        info["platform_version"] = device.client.platform_version
    with contextlib.suppress(Exception):
        info["memory_bytes"] = device.memory_stats().get("bytes_limit")
    for package in ("torch", "transformers", "flax", "numpy", "jax-cuda13-plugin", "jax-cuda12-plugin"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    with contextlib.suppress(Exception):
        info["git"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                     capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    return info


def copy_bandwidth(nbytes: int) -> dict:
    """Bytes read + written per second by an elementwise pass over a large array: the decode ceiling."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((nbytes // 4,), jnp.float32)
    step = jax.jit(lambda a: a + 1.0)
    jax.block_until_ready(step(x))
    times = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(step(x))
        times.append(time.perf_counter() - t)
    best, median = min(times), statistics.median(times)
    return {"array_bytes": nbytes, "best_GBps": 2 * nbytes / best / 1e9, "median_GBps": 2 * nbytes / median / 1e9}


def relative_error(out, ref) -> float:
    import jax.numpy as jnp

    return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))


def flash_inputs(case: FlashCase, rng):
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if case.dtype == "bf16" else jnp.float32
    q = jnp.asarray(rng.standard_normal((case.b, case.t, case.n, case.h), "float32"), dtype)
    k = jnp.asarray(rng.standard_normal((case.b, case.s, case.k, case.h), "float32"), dtype)
    v = jnp.asarray(rng.standard_normal((case.b, case.s, case.k, case.h), "float32"), dtype)
    qp = jnp.broadcast_to(case.offset + jnp.arange(case.t, dtype=jnp.int32), (case.b, case.t))
    kp = jnp.broadcast_to(jnp.arange(case.s, dtype=jnp.int32), (case.b, case.s))
    return q, k, v, qp, kp


def paged_inputs(case: PagedCase, rng) -> tuple[tuple, dict]:
    """Pages for case.b rows in a pool of b · pages_per_seq + 1 pages (page 0 the padding target, as the engine
    sizes it: not a power of two), rows of decreasing length, float32 queries at the end of each row."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from corejax.kernels.kv_quant import quantize_kv

    pps = case.context // PAGE
    pages = case.b * pps + 1
    shape = (case.k, pages, PAGE, case.h)
    if case.layers:
        shape = (case.layers, *shape)
    kp = rng.standard_normal(shape, "float32")
    vp = rng.standard_normal(shape, "float32")
    k_scales = v_scales = None
    if case.kv == "bf16":  # bf16 pages as their bit patterns, as corejax/engine/cache.py stores them
        kp, vp = (jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.bfloat16), jnp.uint16) for x in (kp, vp))
    elif case.kv == "int8":
        (kp, k_scales), (vp, v_scales) = quantize_kv(jnp.asarray(kp), "int8"), quantize_kv(jnp.asarray(vp), "int8")
    else:
        kp, vp = jnp.asarray(kp), jnp.asarray(vp)
    table = jnp.asarray(rng.permutation(np.arange(1, pages))[: case.b * pps].reshape(case.b, pps), jnp.int32)
    lengths = np.linspace(case.context, max(case.t, case.context // 8), case.b).astype(np.int32)
    q_positions = jnp.asarray(lengths[:, None] - case.t + np.arange(case.t)[None, :], jnp.int32)
    q = jnp.asarray(rng.standard_normal((case.b, case.t, case.n, case.h), "float32"))  # float32, as the model's
    args = (q, kp, vp, table, jnp.asarray(lengths), q_positions, k_scales, v_scales)
    kw = {"window": case.window}
    if case.layers:  # the engine's form: a traced layer index and a traced window
        kw = {"window": jnp.int32(case.window), "layer": jnp.int32(case.layers - 1)}
    return args, kw


def kernel_case(case: FlashCase | PagedCase, interpret: bool, iters: int) -> dict:
    """Pallas against the float32 reference (highest matmul precision), then Pallas and lax timed."""
    import jax
    import numpy as np
    from corejax.kernels.flash_attention import flash_attention, flash_attention_reference
    from corejax.kernels.paged_attention import paged_attention, paged_attention_reference
    from corejax.kernels.flash_attention import BlockSizes as FlashBlocks
    from corejax.kernels.paged_attention import BlockSizes as PagedBlocks

    rng = np.random.default_rng(0)
    result: dict = {"case": dataclasses.asdict(case), "kind": "flash" if isinstance(case, FlashCase) else "paged"}
    if isinstance(case, FlashCase):
        args = flash_inputs(case, rng)
        blocks = FlashBlocks(*case.block) if case.block else None
        run = {impl: (lambda impl=impl: flash_attention(*args, window=case.window, impl=impl, interpret=interpret,
                                                        block_sizes=blocks if impl == "pallas" else None))
               for impl in ("pallas", "lax")}
        with jax.default_matmul_precision("float32"):
            ref = flash_attention_reference(*args, window=case.window)
        dtype = case.dtype
    else:
        args, kw = paged_inputs(case, rng)
        blocks = PagedBlocks(case.block_kv) if case.block_kv else None
        run = {impl: (lambda impl=impl: paged_attention(*args, impl=impl, interpret=interpret, **kw,
                                                        block_sizes=blocks if impl == "pallas" else None))
               for impl in ("pallas", "lax")}
        q, kp, vp, table, lengths, q_positions, k_scales, v_scales = args
        if case.layers:
            kp, vp = kp[case.layers - 1], vp[case.layers - 1]
        with jax.default_matmul_precision("float32"):
            ref = paged_attention_reference(q, kp, vp, k_scales, v_scales, table, lengths, q_positions,
                                            window=case.window)
        dtype = case.kv
    for impl, fn in run.items():
        try:
            first, ms = timed(fn, iters)
            err = relative_error(fn(), ref)
            result[impl] = {"first_call_s": round(first, 3), "ms": round(ms, 4), "rel_err": err,
                            "pass": err <= TOLERANCE[dtype]}
        except Exception as e:  # a kernel that does not compile on this device is a result, not the end of the run
            result[impl] = {"error": clip(f"{type(e).__name__}: {e}")}
    result["tolerance"] = TOLERANCE[dtype]
    return result


def device_part(args, record: Record) -> None:
    import jax

    smoke = args.smoke
    interpret = jax.default_backend() != "gpu"
    record.set("environment", environment())
    print(f"  {record.data['environment'].get('device')} ({record.data['environment'].get('backend')}), "
          f"jax {record.data['environment']['jax']}", flush=True)
    if "bandwidth" not in record.data:
        try:
            with watchdog(record, "copy bandwidth", 60):
                record.set("bandwidth", copy_bandwidth((64 if smoke else 2048) << 20))
            print(f"  copy bandwidth {record.data['bandwidth']['median_GBps']:.0f} GB/s", flush=True)
        except Exception as e:
            record.error("copy bandwidth", e)
    cases = [smoke_case(c) if smoke else c for c in FLASH_CASES + PAGED_CASES]
    results = record.data.setdefault("kernels", [])
    done = {r["case"]["name"] for r in results}
    for case in cases:
        if case.name in done:
            continue
        record.set("current", case.name)
        try:
            with watchdog(record, case.name, args.case_timeout):
                result = kernel_case(case, interpret, iters=3 if smoke else 20)
        except Exception as e:
            result = {"case": dataclasses.asdict(case), "error": record.error(case.name, e)}
        results.append(result)
        record.set("current", None)
        print("  " + kernel_line(result), flush=True)


def kernel_line(r: dict) -> str:
    def cell(impl: str) -> str:
        x = r.get(impl)
        if x is None:
            return "-"
        if "error" in x:
            return "ERROR " + headline(x["error"], 70)
        return f"{x['rel_err']:.1e} {'ok' if x['pass'] else 'FAIL'} {x['ms']:.3f} ms"

    if "error" in r:
        return f"{r['case']['name']:<44} ERROR {headline(r['error'])}"
    return f"{r['case']['name']:<44} pallas {cell('pallas'):<40} lax {cell('lax')}"


# ---- part: engine ------------------------------------------------------------------------------------------


def decode_bytes(shape: ModelShape, weight_bytes: int, rows: int) -> float:
    """Bytes one decode step must read: every weight once, and each row's bf16 keys and values over the mean
    context of the timed steps."""
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2
    return weight_bytes + rows * (shape.prompt + (shape.new_tokens + 1) / 2) * kv_per_token


def model_config(shape: ModelShape):
    from corejax.types.config import ModelConfig, RopeScaling

    return ModelConfig(arch="llama", vocab_size=shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers,
                       num_heads=shape.heads, num_kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                       ffn_size=shape.ffn, norm_eps=1e-5, rope_theta=ROPE_THETA, max_context=MAX_CONTEXT,
                       tie_embeddings=True, rope_scaling=RopeScaling("llama3", **ROPE_LLAMA3))


def random_params(cfg, seed: int = 0) -> dict:
    """bf16 matrices drawn on the device, stacked over layers as the Engine runs them (models/stack.py); norm
    scales float32 ones, as the loader keeps them."""
    import jax
    import jax.numpy as jnp

    from corejax.models.stack import StackedLayers

    keys = iter(jax.random.split(jax.random.key(seed), 16))
    d, f, L = cfg.hidden_size, cfg.ffn_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    draw = jax.jit(lambda key, shape, std: (jax.random.normal(key, shape, jnp.float32) * std).astype(jnp.bfloat16),
                   static_argnums=(1, 2))
    matrices = {"wq": (L, d, q), "wk": (L, d, kv), "wv": (L, d, kv), "wo": (L, q, d),
                "w_gate": (L, d, f), "w_up": (L, d, f), "w_down": (L, f, d)}
    groups = {name: (draw(next(keys), shape, WEIGHT_STD),) for name, shape in matrices.items()}
    groups.update(attn_norm=(jnp.ones((L, d), jnp.float32),), ffn_norm=(jnp.ones((L, d), jnp.float32),))
    slots = tuple((name, tuple((0, i) for i in range(L))) for name in groups)
    return {"layers": StackedLayers(groups=groups, slots=slots), "final_norm": jnp.ones((d,), jnp.float32),
            "lm_head": draw(next(keys), (d, cfg.vocab_size), EMBED_STD)}  # tied: the embedding is lm_head [D, V]


def save_params(params: dict, cfg, folder: Path) -> None:
    """For the hf part: each bf16 array as its uint16 bits (.npy), and corejax's RoPE frequencies, so the torch
    process never imports JAX (two CUDA stacks in one process)."""
    import numpy as np

    from corejax.models.layers import rope_inv_freq

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {name: group[0] for name, group in params["layers"].groups.items()}
    arrays.update(final_norm=params["final_norm"], lm_head=params["lm_head"],
                  inv_freq=rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    for name, a in arrays.items():
        host = np.asarray(a)
        np.save(folder / f"{name}.npy", host.view(np.uint16) if host.dtype.itemsize == 2 else host)


def attention_policy(policy: str, interpret: bool):
    """The kernel policy (kernels/policy.py Kernels) a policy name runs: "shipped" is what a runner on this
    device picks (Kernels.detect), "xla" attention through lax only, "pallas" decode attention as Pallas."""
    import jax

    from corejax.kernels.policy import Kernels

    if policy == "shipped":
        return Kernels.detect()
    return Kernels(platform=jax.default_backend(), pallas=policy == "pallas", interpret=interpret)


class EngineRun:
    """Drives one Engine's jitted programs as corejax/serving/scheduler.py does (prefill chunk with the final chunk's
    greedy sample, then decode steps), each row on its own pages: row r holds pages r·W + 1 .. (r + 1)·W."""

    def __init__(self, shape: ModelShape, params: dict, cfg, kernels):
        from corejax.types.config import EngineConfig
        from corejax.serving.batch import bucket
        from corejax.serving.runner import ModelRunner

        self.shape, self.cfg = shape, cfg
        self.width = bucket(-(-(shape.prompt + shape.new_tokens) // PAGE), 16)  # the scheduler's table width
        self.engine = ModelRunner(cfg, params, EngineConfig(page_size=PAGE, kv_dtype="bf16", prefix_cache=False,
                                                            kv_cache_tokens=shape.batch * self.width * PAGE), kernels)

    def _sampling(self, rows: int):
        import numpy as np

        from corejax.types.options import SamplingParams
        from corejax.engine.sampling import SamplingTensors

        greedy = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * rows, self.cfg.vocab_size,
                                             batch_size=rows)
        return greedy, np.zeros((rows, 2), np.uint32)

    def _table(self, rows: list[int]):
        import numpy as np

        return np.stack([np.arange(r * self.width + 1, (r + 1) * self.width + 1, dtype=np.int32) for r in rows])

    def prefill(self, row: int, prompt) -> int:
        """One prompt in one chunk into row `row`'s pages -> its first greedy token."""
        import numpy as np

        from corejax.serving.batch import MIN_PREFILL_BUCKET, bucket

        n = len(prompt)
        t = bucket(n, MIN_PREFILL_BUCKET)
        tokens = np.zeros((1, t), np.int32)
        tokens[0, :n] = prompt
        positions = np.arange(t, dtype=np.int32)[None]
        sampling, keys = self._sampling(1)
        eng = self.engine
        cache = eng.cache.with_rows(self._table([row]), np.array([n], np.int32))
        out, eng.cache = eng.programs.prefill(eng.params, tokens, positions, np.array([n - 1], np.int32), cache,
                                              cfg=self.cfg, kernels=eng.kernels, sampling=sampling, keys=keys,
                                              penalties=None)
        return int(np.asarray(out.tokens)[0])

    def decode(self, first: list[int], start: int, steps: int, chained: bool):
        """`steps` greedy steps for rows 0 .. len(first) - 1, the first fed token of each at position `start`.
        chained=False reads each step's tokens back to the host before the next (the scheduler's loop);
        chained=True feeds the device array straight back, so steps queue up on the device. Other arrays go in
        as the scheduler passes them (NumPy: the cache, page table included, is donated to each step); the fed
        tokens go in as a device array in both loops, so both run one compiled program (JAX keys its cache on
        NumPy vs device arguments). -> (tokens [B, steps], seconds)."""
        import jax
        import numpy as np

        b = len(first)
        sampling, keys = self._sampling(b)
        table = self._table(list(range(b)))
        device = jax.devices()[0]
        tokens = jax.device_put(np.asarray(first, np.int32)[:, None], device)
        eng, out_tokens = self.engine, []
        t0 = time.perf_counter()
        for i in range(steps):
            pos = start + i
            lengths = np.full((b,), pos + 1, np.int32)
            out, eng.cache, _ = eng.programs.decode_step(eng.params, tokens, np.full((b, 1), pos, np.int32),
                                                         eng.cache.with_rows(table, lengths), sampling, None, keys,
                                                         np.full((b,), i + 1, np.int32), cfg=self.cfg,
                                                         kernels=eng.kernels)
            tokens = out.tokens if chained else jax.device_put(np.asarray(out.tokens), device)
            out_tokens.append(tokens)
        jax.block_until_ready(tokens)
        seconds = time.perf_counter() - t0
        return np.concatenate([np.asarray(t) for t in out_tokens], axis=1), seconds


def engine_part(args, record: Record) -> None:
    import jax
    import numpy as np

    import_corejax()
    from corejax.engine.programs import programs_built

    smoke, policy = args.smoke, args.child.split(":", 1)[1]
    f32_weights = policy.endswith("-f32")
    policy = policy.removesuffix("-f32")
    shape = SMOKE_MODEL if smoke else LLAMA_1B
    interpret = jax.default_backend() != "gpu"
    kernels = attention_policy(policy, interpret)
    cfg = model_config(shape)
    record.set("shape", dataclasses.asdict(shape))
    record.set("policy", policy)
    record.set("weights", "float32" if f32_weights else "bfloat16")
    with watchdog(record, "random weights", 120):
        params = random_params(cfg)
        if f32_weights:  # the same values, exactly: what bf16 storage saves, if XLA keeps it bf16
            params = jax.tree.map(lambda x: x.astype(jax.numpy.float32), params)
        jax.block_until_ready(params)
    weight_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))
    record.set("weight_bytes", weight_bytes)
    if args.handoff and args.save_weights:
        with watchdog(record, "saving weights for hf", 120):
            save_params(params, cfg, Path(args.handoff) / "weights")
    run = EngineRun(shape, params, cfg, kernels)
    record.set("kv_pool_bytes", run.engine.kv_cache_bytes)
    prompts = np.random.default_rng(1).integers(0, shape.vocab, (shape.batch, shape.prompt)).astype(np.int32)
    built = programs_built()

    # Prefill: a 512-token prompt, batch 1, one chunk (the scheduler's chunk size), then timed repeats. Where it
    # does not compile, decode is still timed, over the unfilled cache: the same work.
    first0 = None
    try:
        with watchdog(record, f"prefill compile ({policy})", 2 * args.case_timeout):
            t = time.perf_counter()
            first0 = run.prefill(0, prompts[0])
            record.set("prefill_first_call_s", time.perf_counter() - t)
        times = []
        for _ in range(2 if smoke else 5):
            t = time.perf_counter()
            run.prefill(0, prompts[0])
            times.append(time.perf_counter() - t)
        record.set("prefill", {"tokens": shape.prompt, "median_s": statistics.median(times),
                               "tok_per_s": shape.prompt / statistics.median(times)})
        print(f"  prefill {shape.prompt} tokens: {record.data['prefill']['tok_per_s']:.0f} tok/s "
              f"(first call {record.data['prefill_first_call_s']:.1f} s)", flush=True)
    except Exception as e:
        record.error(f"prefill ({policy})", e)

    # Decode at batch 1, then at batch 8 (each row prefilled alone first).
    gen1 = None
    for rows in (1, shape.batch):
        try:
            firsts = [first0] + [run.prefill(r, prompts[r]) for r in range(1, rows)] if first0 is not None \
                else [0] * rows
            entry, tokens = decode_timings(run, record, firsts, policy, 2 * args.case_timeout)
            entry["bytes_per_step"] = decode_bytes(shape, weight_bytes, rows)
            entry["achieved_GBps"] = entry["bytes_per_step"] / (entry["chained"]["ms_per_step"] / 1e3) / 1e9
            if first0 is None:
                entry["note"] = "prefill failed: timed over an unfilled cache (same work; tokens meaningless)"
            elif rows == 1:
                gen1 = [first0, *tokens[0].tolist()]
            else:
                entry["row0_equals_batch1"] = gen1 is not None and [first0, *tokens[0].tolist()] == gen1
            record.set(f"decode_b{rows}", entry)
        except Exception as e:
            record.error(f"decode b{rows} ({policy})", e)
    record.set("programs_built", {k: v - built.get(k, 0) for k, v in programs_built().items() if v - built.get(k, 0)})
    if args.handoff and gen1 is not None:
        handed = Path(args.handoff) / "tokens.json"
        if handed.exists():  # every variant computes the same math: its greedy tokens should match the first's
            earlier = json.loads(handed.read_text())
            record.set("tokens_equal_" + earlier["part"], earlier["generated"] == gen1)
        else:
            handed.write_text(json.dumps({"prompts": prompts.tolist(), "generated": gen1, "part": args.child}))


def decode_timings(run: EngineRun, record: Record, firsts: list[int], policy: str, compile_limit: float):
    """Greedy decode from the prompts' end, timed as a host loop and chained (each after a 2-step warm-up that
    compiles) -> (the record entry, the host loop's tokens [B, steps])."""
    shape, rows = run.shape, len(firsts)
    entry: dict = {"rows": rows, "steps": shape.new_tokens}
    generated = {}
    for key in ("host_loop", "chained"):
        label = f"decode b{rows} {key.replace('_', ' ')}"
        with watchdog(record, f"{label} compile ({policy})", compile_limit):
            t = time.perf_counter()
            run.decode(firsts, shape.prompt, 2, key == "chained")
            warmup = time.perf_counter() - t
        generated[key], seconds = run.decode(firsts, shape.prompt, shape.new_tokens, key == "chained")
        entry[key] = {"warmup_s": warmup, "seconds": seconds, "ms_per_step": seconds / shape.new_tokens * 1e3,
                      "tok_per_s": rows * shape.new_tokens / seconds}
        print(f"  {label}: {entry[key]['tok_per_s']:.1f} tok/s ({entry[key]['ms_per_step']:.2f} ms/step)", flush=True)
    entry["chained_equals_host_loop"] = bool((generated["chained"] == generated["host_loop"]).all())
    return entry, generated["host_loop"]


# ---- part: hf ----------------------------------------------------------------------------------------------


def hf_model(shape: ModelShape, device: str):
    """LlamaForCausalLM of the same shape, built on `device` in bf16 (as from_pretrained(dtype=bf16) builds it:
    RoPE frequencies stay float32)."""
    import inspect

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                  num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                  head_dim=shape.head_dim, rms_norm_eps=1e-5, max_position_embeddings=MAX_CONTEXT,
                  tie_word_embeddings=True)
    rope = {"rope_type": "llama3", "factor": ROPE_LLAMA3["factor"], "low_freq_factor": ROPE_LLAMA3["low_freq_factor"],
            "high_freq_factor": ROPE_LLAMA3["high_freq_factor"],
            "original_max_position_embeddings": ROPE_LLAMA3["original_max_position"]}
    try:
        if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:  # transformers 5
            config = LlamaConfig(**common, rope_parameters={**rope, "rope_theta": ROPE_THETA})
        else:
            config = LlamaConfig(**common, rope_theta=ROPE_THETA, rope_scaling=rope)
    except Exception:  # check_rope puts corejax's frequencies in either way
        config = LlamaConfig(**common, rope_theta=ROPE_THETA)

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def load_hf_weights(model, folder: Path, device: str) -> None:
    """corejax's [in, out] matrices into HF's [out, in] Linear weights (transposed on the device)."""
    import numpy as np
    import torch

    def tensor(name: str):
        a = np.load(folder / f"{name}.npy")
        if a.dtype == np.uint16:  # bf16 bits; through int16, which torch supports everywhere (uint16 barely)
            return torch.from_numpy(a.view(np.int16)).to(device).view(torch.bfloat16)
        return torch.from_numpy(a).to(device)

    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    with torch.no_grad():
        for ours, theirs in names.items():
            stacked = tensor(ours)  # [L, in, out]
            for i, layer in enumerate(model.model.layers):
                layer.get_submodule(theirs).weight.copy_(stacked[i].T)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.model.embed_tokens.weight.copy_(tensor("lm_head").T)  # tied: lm_head follows
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings not tied"


def hf_part(args, record: Record) -> None:
    import inspect

    import numpy as np
    import torch

    smoke = args.smoke
    shape = SMOKE_MODEL if smoke else LLAMA_1B
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    record.set("device", torch.cuda.get_device_name(0) if device == "cuda" else "cpu")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = hf_model(shape, device)
    handoff = Path(args.handoff) if args.handoff else None
    same_weights = handoff is not None and (handoff / "weights" / "lm_head.npy").exists()
    handed = None
    if same_weights:
        load_hf_weights(model, handoff / "weights", device)
        if (handoff / "tokens.json").exists():
            handed = json.loads((handoff / "tokens.json").read_text())
        else:
            record.error("comparison", "the engine part wrote no greedy tokens: no comparison")
    else:
        record.error("weights", "no weights from an engine part: HF keeps its own random init, no comparison")
    record.set("same_weights", same_weights)

    if same_weights:
        try:
            check_rope(record, model, handoff / "weights" / "inv_freq.npy")
        except Exception as e:
            record.error("rope check", e)

    prompts = np.random.default_rng(1).integers(0, shape.vocab, (shape.batch, shape.prompt)).astype(np.int64)
    if handed is not None:
        prompts = np.asarray(handed["prompts"], np.int64)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def forward(ids, **kw):
        return model(input_ids=ids, use_cache=True, **kw)

    with torch.inference_mode():
        ids = torch.from_numpy(prompts[:1]).to(device)
        times = []
        for i in range(2 + (2 if smoke else 5)):
            sync()
            t = time.perf_counter()
            forward(ids, **keep)
            sync()
            if i >= 2:
                times.append(time.perf_counter() - t)
        record.set("prefill", {"tokens": shape.prompt, "median_s": statistics.median(times),
                               "tok_per_s": shape.prompt / statistics.median(times), "logits_to_keep": bool(keep)})
        print(f"  HF prefill {shape.prompt} tokens: {record.data['prefill']['tok_per_s']:.0f} tok/s", flush=True)

        def greedy(rows: int, steps: int):
            out = forward(torch.from_numpy(prompts[:rows]).to(device), **keep)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens = [token]
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                out = forward(token, past_key_values=cache)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                tokens.append(token)
            sync()
            return torch.cat(tokens, dim=1).cpu().numpy(), time.perf_counter() - t

        generated = None
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
        for rows in (1, shape.batch):
            greedy(rows, 3)  # warm-up: cuBLAS handles, allocator
            tokens, seconds = greedy(rows, shape.new_tokens)
            step = seconds / shape.new_tokens
            record.set(f"decode_b{rows}", {"rows": rows, "steps": shape.new_tokens, "seconds": seconds,
                                           "ms_per_step": step * 1e3, "tok_per_s": rows / step,
                                           "bytes_per_step": decode_bytes(shape, weight_bytes, rows),
                                           "achieved_GBps": decode_bytes(shape, weight_bytes, rows) / step / 1e9})
            print(f"  HF decode b{rows}: {record.data[f'decode_b{rows}']['tok_per_s']:.1f} tok/s", flush=True)
            if rows == 1:
                generated = tokens[0].tolist()

        if handed is not None:
            compare(record, model, handed["generated"], generated, prompts[0].tolist(), device)


def check_rope(record: Record, model, path: Path) -> None:
    """HF's RoPE frequencies against corejax's (the llama3 scaling is computed by each library from the config):
    a difference would explain any disagreement, so it is recorded and then replaced by corejax's."""
    import numpy as np
    import torch

    ours = torch.from_numpy(np.load(path))
    rotary = model.model.rotary_emb
    theirs = rotary.inv_freq.detach().float().cpu()
    diff = float(((theirs - ours).abs() / ours.abs()).max())
    record.set("rope", {"hf_dtype": str(rotary.inv_freq.dtype), "max_rel_diff": diff, "replaced": diff > 1e-6})
    if diff > 1e-6:
        rotary.inv_freq.copy_(ours.to(rotary.inv_freq.device, rotary.inv_freq.dtype))


def compare(record: Record, model, ours: list[int], hf_free: list[int], prompt: list[int], device: str) -> None:
    """corejax's greedy tokens against HF's: teacher-forced (HF's argmax at each position of corejax's own
    sequence, so one early disagreement does not derail the rest) in bf16 and float32, and free-running."""
    import torch

    ids = torch.tensor([prompt + ours[:-1]], device=device)
    start = len(prompt) - 1
    result = {"tokens": len(ours), "first_token_equal": ours[0] == hf_free[0],
              "free_running_common_prefix": next(
                  (i for i, (a, b) in enumerate(zip(ours, hf_free, strict=True)) if a != b), len(ours))}
    for label in ("bf16", "float32"):
        if label == "float32":
            model.float()
        logits = model(input_ids=ids).logits[0, start:].float()
        argmax = logits.argmax(-1).cpu().tolist()
        agree = [a == b for a, b in zip(ours, argmax, strict=True)]
        top2 = logits.topk(2, dim=-1).values
        gap = (top2[:, 0] - top2[:, 1]).cpu()
        disagree_gaps = [float(gap[i]) for i, ok in enumerate(agree) if not ok]
        result[label] = {"teacher_forced_agreement": sum(agree) / len(agree),
                         "disagreements": len(agree) - sum(agree),
                         "median_top2_gap": float(gap.median()),
                         "top2_gap_at_disagreements": disagree_gaps[:16]}
    record.set("comparison", result)
    print(f"  greedy agreement with HF (teacher-forced): bf16 {result['bf16']['teacher_forced_agreement']:.3f}, "
          f"float32 {result['float32']['teacher_forced_agreement']:.3f}; first token equal: "
          f"{result['first_token_equal']}", flush=True)


# ---- the parent: parts under a time budget, then the table and the JSON --------------------------------------


PARTS = [("device", 120), ("engine:xla", 110), ("hf", 80), ("engine:pallas-decode", 90), ("engine:xla-f32", 90),
         ("engine:shipped", 75)]
MIN_PART_S = 30  # a part is not started with less time left than this


def part_files(workdir: Path, name: str) -> tuple[Path, Path]:
    """(the part's record, its stderr)"""
    stem = workdir / name.replace(":", "_")
    return stem.with_suffix(".json"), stem.with_suffix(".log")


def run_part(name: str, limit: float, args, workdir: Path, extra: list[str]) -> dict:
    """Runs one part in a fresh process; returns its record, with how it ended."""
    result, log = part_files(workdir, name)
    cmd = [sys.executable, __file__, "--child", name, "--result", str(result), "--handoff", str(workdir),
           "--case-timeout", str(args.case_timeout), *(["--smoke"] if args.smoke else []), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.smoke:
        env.setdefault("JAX_PLATFORMS", "cpu")
    t = time.perf_counter()
    with log.open("a") as err:
        try:
            proc = subprocess.run(cmd, stderr=err, timeout=limit, env=env, check=False)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"killed at the {limit:.0f} s limit"
    record = json.loads(result.read_text()) if result.exists() else {"errors": []}
    record["status"] = record.get("status", "") + (", " if record.get("status") else "") + status
    record["seconds"] = round(record.get("seconds", 0) + time.perf_counter() - t, 1)
    if status != "ok":
        tail = log.read_text(errors="replace")[-3000:]
        record["stderr_tail"] = tail
        print(f"  [{name}: {status}]\n" + "\n".join("  | " + line for line in tail.splitlines()[-12:]), flush=True)
    result.write_text(json.dumps(record, indent=1, default=str))
    return record


def output_path(smoke: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu.json"
    if smoke:  # a smoke run is no result: into the ignored benchmarks/out/
        return ROOT / "benchmarks" / "out" / "gpu-smoke.json"
    return ROOT / "benchmarks" / "results" / f"gpu-{datetime.date.today().isoformat()}.json"


def main_parent(args) -> None:
    started = time.time()
    deadline = time.perf_counter() + args.budget
    workdir = Path(tempfile.mkdtemp(prefix="corejax-gpu-"))
    out = output_path(args.smoke)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "smoke": args.smoke,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "budget_s": args.budget, "parts": {}}
    # An outer `timeout` sends SIGTERM: end through the finally below (table, JSON), killing the running part.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for name, limit in PARTS:
            if args.parts and name not in args.parts:
                continue
            left = deadline - time.perf_counter()
            if left < MIN_PART_S:
                report["parts"][name] = {"status": f"skipped: {left:.0f} s of the budget left"}
                continue
            print(f"[{name}] (limit {min(limit * (3 if args.smoke else 1), left):.0f} s)", flush=True)
            extra = ["--save-weights"] if name == "engine:xla" and (not args.parts or "hf" in args.parts) else []
            record = run_part(name, min(limit * (3 if args.smoke else 1), left), args, workdir, extra)
            # The device part resumes past a case that ended its process (done cases are kept in its record).
            for restart in range(5):
                if name != "device" or not record.get("current"):
                    break
                reason = record["status"]
                if record.get("errors") and record["errors"][-1]["where"] == record["current"]:
                    reason = record["errors"][-1]["error"]  # the watchdog's
                record.setdefault("kernels", []).append(
                    {"case": {"name": record["current"]}, "error": f"the process ended during this case: {reason}"})
                record["current"] = None
                part_files(workdir, name)[0].write_text(json.dumps(record, indent=1, default=str))
                left = deadline - time.perf_counter()
                if restart == 4 or left < MIN_PART_S:
                    break
                print(f"[device] resuming after {record['status']}", flush=True)
                record = run_part(name, min(limit, left), args, workdir, [])
            report["parts"][name] = record
            out.write_text(json.dumps(report, indent=1, default=str))  # so far, should the run be cut short
    finally:
        report["wall_s"] = round(time.time() - started, 1)
        for name, _ in PARTS:  # a part cut short by SIGTERM: what its record holds so far
            result = part_files(workdir, name)[0]
            if name not in report["parts"] and result.exists():
                report["parts"][name] = dict(json.loads(result.read_text()), status="interrupted")
        if os.environ.get("OUT"):  # each part's stderr (compiler messages in full), its last 200 kB
            logs = Path(os.environ["OUT"]) / "gpu-logs"
            logs.mkdir(parents=True, exist_ok=True)
            for log in workdir.glob("*.log"):
                (logs / log.name).write_bytes(log.read_bytes()[-200_000:])
        bandwidth = report["parts"].get("device", {}).get("bandwidth", {}).get("median_GBps")
        for record in report["parts"].values():
            for key, entry in record.items():
                if key.startswith("decode_b") and bandwidth and "achieved_GBps" in entry:
                    entry["fraction_of_copy_bandwidth"] = entry["achieved_GBps"] / bandwidth
        shutil.rmtree(workdir, ignore_errors=True)
        summarize(report)
        out.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {out}")


def summarize(report: dict) -> None:
    """The table: kernels, then engine variants beside HF, with decode's share of the measured copy bandwidth."""
    parts = report["parts"]
    device = parts.get("device", {})
    env = device.get("environment", {})
    names = ("device", "jax", "jaxlib", "torch", "transformers")
    print("\n=== " + ", ".join(f"{k} {env[k]}" for k in names if k in env))
    bandwidth = device.get("bandwidth", {}).get("median_GBps")
    if bandwidth:
        print(f"copy bandwidth (read + write of a {device['bandwidth']['array_bytes'] >> 20} MiB array): "
              f"{bandwidth:.0f} GB/s")
    if device.get("kernels"):
        print(f"\n{'kernel case':<44} {'pallas: err vs ref, time':<47} lax: err, time")
        for r in device["kernels"]:
            print(kernel_line(r))
    batch = (SMOKE_MODEL if report["smoke"] else LLAMA_1B).batch
    if any(name.startswith(("engine", "hf")) for name in parts):
        print(f"\n{'model run (tok/s)':<22}{'prefill':>9}{'b1 host':>9}{'b1 chain':>9}{f'b{batch} host':>9}"
              f"{f'b{batch} chain':>9}{'b1 GB/s':>9}{'of copy':>8}  status")
    for name, r in parts.items():
        if not name.startswith(("engine", "hf")):
            continue
        b1, bn = r.get("decode_b1", {}), r.get(f"decode_b{batch}", {})
        engine = name.startswith("engine")

        def rate(x: dict | None, digits: int = 1) -> str:
            return f"{x['tok_per_s']:.{digits}f}" if x and "tok_per_s" in x else "-"

        gbps = b1.get("achieved_GBps")
        share = f"{gbps / bandwidth:.0%}" if gbps and bandwidth else "-"
        status = r.get("status", "")
        if r.get("errors"):
            status += "; " + r["errors"][0]["where"] + ": " + headline(r["errors"][0]["error"], 60)
        # HF's loop never reads a token back to the host: it compares with corejax's chained loop.
        print(f"{name:<22}{rate(r.get('prefill'), 0):>9}{rate(b1.get('host_loop')) if engine else '-':>9}"
              f"{rate(b1.get('chained') if engine else b1):>9}{rate(bn.get('host_loop')) if engine else '-':>9}"
              f"{rate(bn.get('chained') if engine else bn):>9}{f'{gbps:.0f}' if gbps else '-':>9}{share:>8}  {status}")
    comparison = parts.get("hf", {}).get("comparison")
    if comparison:
        print(f"\ncorejax greedy tokens vs HF on the same weights ({comparison['tokens']} tokens): teacher-forced "
              f"agreement bf16 {comparison['bf16']['teacher_forced_agreement']:.3f}, float32 "
              f"{comparison['float32']['teacher_forced_agreement']:.3f}; free-running common prefix "
              f"{comparison['free_running_common_prefix']}")
    for name, r in parts.items():
        for e in r.get("errors", []):
            print(f"error [{name}] {e['where']}: {headline(e['error'], 160)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any backend (Pallas interpreted off GPU)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 300; smoke 900)")
    ap.add_argument("--parts", nargs="+", choices=[p for p, _ in PARTS], help="run only these parts")
    ap.add_argument("--case-timeout", type=float, default=None,
                    help="seconds one kernel case may take, twice that one engine compile (default 60; smoke 240)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--handoff", help=argparse.SUPPRESS)
    ap.add_argument("--save-weights", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.budget = args.budget or (900 if args.smoke else 300)
    args.case_timeout = args.case_timeout or (240 if args.smoke else 60)
    if not args.child:
        main_parent(args)
        return
    import warnings

    # jax 0.11 warns at every Pallas Triton lowering that the backend is deprecated; one line is enough.
    warnings.filterwarnings("once", message=".*Triton backend is deprecated.*")
    if args.child != "hf":
        import_corejax()
    record = Record(Path(args.result))
    part = {"device": device_part, "hf": hf_part}.get(args.child, engine_part)
    try:
        part(args, record)
    except Exception as e:
        record.error(args.child, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2500:]}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
