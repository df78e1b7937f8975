"""The quantized matmul's native kernel (kernels/quant_matmul.cc) as a JAX function: float rows times a
matrix kept in column groups of 4- or 8-bit codes with per-block scales (and minimums), the activations
quantized to int8 per row inside the kernel, as llama.cpp does. corejax/weights/quant.py owns the weight format
(QuantArray) and the XLA fallback that is also this kernel's reference (tests/test_quant.py compares them)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "corejax_quant_matmul"
EXPERTS_TARGET = "corejax_quant_matmul_experts"
GROUP = 16  # columns per group (kG in quant_matmul.cc)


def usable_threads() -> int:
    """The cores this process may run on (its affinity mask): the native kernels' upper bound on workers."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def quant_matmul(x2: jax.Array, codes: jax.Array, scales: jax.Array, mins: jax.Array | None,
                 layer: jax.Array | int | None, *, bits: int, block: int, offset: int, code_max: int) -> jax.Array:
    """x2 [rows, d_in] float32 @ a grouped quantized matrix -> [rows, groups * GROUP] float32 (the caller trims
    the padded columns). codes/scales/mins: QuantArray's arrays, with a leading layer axis when `layer` (an int32
    index the kernel reads in place) is given."""
    rows = x2.shape[0]
    padded = codes.shape[-3] * GROUP
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, padded), jnp.float32))(
        x2, codes, scales, scales if mins is None else mins, jnp.asarray(0 if layer is None else layer, jnp.int32),
        bits=np.int32(bits), block=np.int32(block), offset=np.int32(offset), has_mins=np.int32(mins is not None),
        code_max=np.int32(code_max), threads=np.int32(usable_threads()))


def quant_matmul_experts(x2: jax.Array, codes: jax.Array, scales: jax.Array, mins: jax.Array | None,
                         layer: jax.Array | int | None, counts: jax.Array, *, bits: int, block: int, offset: int,
                         code_max: int) -> jax.Array:
    """A mixture of experts' matmul in one call: x2 [rows, d_in] float32, its rows grouped by expert (counts [E]
    int32 rows of each, in expert order; rows past their sum come back zero), times each group's expert of the
    stacked experts (codes/scales/mins [(L,) E, ...]; `layer` picks the layer, read in place) -> [rows, groups *
    GROUP] float32."""
    rows = x2.shape[0]
    padded = codes.shape[-3] * GROUP
    return jax.ffi.ffi_call(EXPERTS_TARGET, jax.ShapeDtypeStruct((rows, padded), jnp.float32))(
        x2, codes, scales, scales if mins is None else mins, jnp.asarray(0 if layer is None else layer, jnp.int32),
        counts.astype(jnp.int32), bits=np.int32(bits), block=np.int32(block), offset=np.int32(offset),
        has_mins=np.int32(mins is not None), code_max=np.int32(code_max), threads=np.int32(usable_threads()))
