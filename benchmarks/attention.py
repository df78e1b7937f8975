"""Attention kernels on this machine: decode (paged f32/int8/int4 vs dense) and prefill (flash vs dense).

    python benchmarks/attention.py [--quick]

Prints tables and writes benchmarks/out/attention.json. Shapes are one TinyLlama-like layer (32 query
heads, 4 kv heads, head_dim 64, page size 16), batch 1 unless stated. "peak" is XLA's temporary buffer
size for the compiled call (memory_analysis), i.e. what the op allocates beyond its inputs and output.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from corejax.kernels.flash_attention import BlockSizes as FlashBlocks
from corejax.kernels.flash_attention import flash_attention
from corejax.kernels.kv_quant import dequantize_kv, quantize_kv
from corejax.kernels.paged_attention import paged_attention, paged_attention_reference
from jax import lax

from corejax.bench.machine import fingerprint
from corejax.kernels.flash_attention import flash_attention_reference as dense_attention

N, K, H, PAGE = 32, 4, 64, 16


def _time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e3


def _peak(fn, *args) -> int:
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def _pool(rng, b: int, ctx: int):
    pps = ctx // PAGE
    num_pages = b * pps + 1
    table = rng.permutation(np.arange(1, num_pages))[: b * pps].reshape(b, pps).astype(np.int32)
    k = rng.standard_normal((K, num_pages, PAGE, H), np.float32)
    v = rng.standard_normal((K, num_pages, PAGE, H), np.float32)
    return jnp.asarray(k), jnp.asarray(v), jnp.asarray(table)


def decode(ctx: int, b: int, reps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    kp, vp, table = _pool(rng, b, ctx)
    q = jnp.asarray(rng.standard_normal((b, 1, N, H), np.float32))
    lengths = jnp.full((b,), ctx, jnp.int32)
    qpos = (lengths - 1)[:, None]
    rows = []
    # dense reference: contiguous [B, S, K, H], an explicit [T, S] score matrix
    kd = jnp.transpose(kp[:, table].reshape(K, b, ctx, H), (1, 2, 0, 3))
    vd = jnp.transpose(vp[:, table].reshape(K, b, ctx, H), (1, 2, 0, 3))
    kpos = jnp.broadcast_to(jnp.arange(ctx, dtype=jnp.int32), (b, ctx))
    dense = jax.jit(lambda q, k, v: dense_attention(q, k, v, qpos, kpos, window=0, scale=H**-0.5, softcap=0.0))
    rows.append(
        {
            "op": "decode",
            "ctx": ctx,
            "batch": b,
            "impl": "dense reference",
            "kv": "f32",
            "ms": _time(dense, q, kd, vd, reps=reps),
            "kv_bytes": int(kd.nbytes + vd.nbytes),
            "rel_err": 0.0,
        }
    )
    exact = paged_attention_reference(q, kp, vp, None, None, table, lengths, qpos)
    for kv in ("f32", "int8", "int4"):
        if kv == "f32":
            args, nbytes = (q, kp, vp, table, lengths, qpos, None, None), kp.nbytes + vp.nbytes
        else:
            (kq, ks), (vq, vs) = quantize_kv(kp, kv), quantize_kv(vp, kv)
            args, nbytes = (q, kq, vq, table, lengths, qpos, ks, vs), kq.nbytes + ks.nbytes + vq.nbytes + vs.nbytes
        fn = jax.jit(lambda *a: paged_attention(*a, impl="lax"))
        out = fn(*args)
        err = float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact))
        rows.append(
            {
                "op": "decode",
                "ctx": ctx,
                "batch": b,
                "impl": "paged lax",
                "kv": kv,
                "ms": _time(fn, *args, reps=reps),
                "kv_bytes": int(nbytes),
                "rel_err": err,
            }
        )
    return rows


def scale_granularity(ctx: int = 2048) -> list[dict]:
    """Output error of per-(token, head) scales (what the kernels use) vs per-(page, head) scales."""
    rng = np.random.default_rng(1)
    kp, vp, table = _pool(rng, 1, ctx)
    q = jnp.asarray(rng.standard_normal((1, 1, N, H), np.float32))
    lengths = jnp.full((1,), ctx, jnp.int32)
    qpos = (lengths - 1)[:, None]
    exact = paged_attention_reference(q, kp, vp, None, None, table, lengths, qpos)
    rows = []
    for kv in ("int8", "int4"):
        qmax = 127.0 if kv == "int8" else 7.0
        per_token = [dequantize_kv(*quantize_kv(x, kv)) for x in (kp, vp)]
        per_page = []
        for x in (kp, vp):
            s = jnp.max(jnp.abs(x), axis=(2, 3), keepdims=True) / qmax
            per_page.append(jnp.clip(jnp.round(x / s), -qmax, qmax) * s)
        for name, (kd, vd) in (("token,head", per_token), ("page,head", per_page)):
            out = paged_attention_reference(q, kd, vd, None, None, table, lengths, qpos)
            rows.append(
                {"kv": kv, "scales_per": name, "rel_err": float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact))}
            )
    return rows


def prefill(t: int, reps: int, blocks: list[tuple[int, int]]) -> list[dict]:
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((1, t, N, H), np.float32))
    k = jnp.asarray(rng.standard_normal((1, t, K, H), np.float32))
    v = jnp.asarray(rng.standard_normal((1, t, K, H), np.float32))
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    rows = []

    def ref(q, k, v):
        return dense_attention(q, k, v, pos, pos, window=0, scale=H**-0.5, softcap=0.0)

    exact = jax.jit(ref)(q, k, v)
    rows.append(
        {
            "op": "prefill",
            "T": t,
            "impl": "dense reference",
            "window": 0,
            "ms": _time(jax.jit(ref), q, k, v, reps=reps),
            "peak_bytes": _peak(ref, q, k, v),
            "max_abs_err": 0.0,
        }
    )
    for window in (0, 512):
        for bq, bk in blocks if window == 0 else blocks[:1]:

            def fl(q, k, v, bq=bq, bk=bk, window=window):
                return flash_attention(q, k, v, pos, pos, window=window, impl="lax", block_sizes=FlashBlocks(bq, bk))

            out = jax.jit(fl)(q, k, v)
            err = float(jnp.abs(out - exact).max()) if window == 0 else float("nan")
            rows.append(
                {
                    "op": "prefill",
                    "T": t,
                    "impl": f"flash lax {bq}x{bk}",
                    "window": window,
                    "ms": _time(jax.jit(fl), q, k, v, reps=reps),
                    "peak_bytes": _peak(fl, q, k, v),
                    "max_abs_err": err,
                }
            )
    return rows


def layouts(ctx: int = 8192, b: int = 4, ppb: int = 64) -> list[dict]:
    """The page-layout choice: the lax decode loop over [K, P, page, H] vs token-major [P, page, K, H]."""
    rng = np.random.default_rng(0)
    pps = ctx // PAGE
    num_pages = b * pps + 1
    table = jnp.asarray(rng.permutation(np.arange(1, num_pages))[: b * pps].reshape(b, pps).astype(np.int32))
    q = jnp.asarray(rng.standard_normal((b, 1, N, H), np.float32)).reshape(b, 1, K, N // K, H)
    rows = []
    for layout in ("K,P,page,H", "P,page,K,H"):
        shape = (K, num_pages, PAGE, H) if layout[0] == "K" else (num_pages, PAGE, K, H)
        kp = jnp.asarray(rng.standard_normal(shape, np.float32))

        @jax.jit
        def loop(q, kp, vp, table, head_major=layout[0] == "K"):
            def body(j, c):
                o, m, l = c
                ids = lax.dynamic_slice_in_dim(table, j * ppb, ppb, 1)
                if head_major:
                    k, v, spec = kp[:, ids].reshape(K, b, -1, H), vp[:, ids].reshape(K, b, -1, H), "KBSH"
                else:
                    k, v, spec = kp[ids].reshape(b, -1, K, H), vp[ids].reshape(b, -1, K, H), "BSKH"
                s = jnp.einsum(f"BTKGH,{spec}->BKGTS", q, k)
                mn = jnp.maximum(m, s.max(-1))
                p, corr = jnp.exp(s - mn[..., None]), jnp.exp(m - mn)
                return o * corr[..., None] + jnp.einsum(f"BKGTS,{spec}->BKGTH", p, v), mn, l * corr + p.sum(-1)

            o = jnp.zeros((b, K, N // K, 1, H))
            m = jnp.full((b, K, N // K, 1), -1e30)
            o, m, l = lax.fori_loop(0, pps // ppb, body, (o, m, jnp.zeros_like(m)))
            return o / l[..., None]

        rows.append(
            {
                "layout": layout,
                "ctx": ctx,
                "batch": b,
                "pages_per_tile": ppb,
                "ms": _time(loop, q, kp, kp, table, reps=5),
            }
        )
    return rows


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(fmt(r.get(c, "")) for c in cols) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no 8k decode or tile sweep")
    args = ap.parse_args()
    reps = 3 if args.quick else 10
    ctxs = (256, 2048) if args.quick else (256, 2048, 8192)
    decode_rows = [r for ctx in ctxs for r in decode(ctx, 1, reps)]
    print(
        "## decode, one layer, per call\n"
        + _table(decode_rows, ["ctx", "batch", "impl", "kv", "ms", "kv_bytes", "rel_err"])
    )
    gran = scale_granularity()
    print(
        "\n## quantization scale granularity (decode, 2k context, relative L2 error of the output)\n"
        + _table(gran, ["kv", "scales_per", "rel_err"])
    )
    blocks = [(256, 256)] if args.quick else [(128, 128), (256, 256), (512, 512), (256, 1024)]
    pre = prefill(2048, max(1, reps // 5), blocks)
    print("\n## prefill T=2048, one layer\n" + _table(pre, ["T", "impl", "window", "ms", "peak_bytes", "max_abs_err"]))
    lay = [] if args.quick else layouts()
    if lay:
        print(
            "\n## page layout (lax decode loop, B=4)\n"
            + _table(lay, ["layout", "ctx", "batch", "pages_per_tile", "ms"])
        )
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    meta = {
        "fingerprint": fingerprint(),
        "shape": {"num_heads": N, "num_kv_heads": K, "head_dim": H, "page_size": PAGE},
    }
    (out / "attention.json").write_text(
        json.dumps(
            {"meta": meta, "decode": decode_rows, "scale_granularity": gran, "prefill": pre, "layouts": lay}, indent=1
        )
    )
    print(f"\nwrote {out / 'attention.json'}")


if __name__ == "__main__":
    main()
