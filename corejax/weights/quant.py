"""QuantArray: weights kept quantized in memory, and the one quantized matmul every model uses.

A [d_in, d_out] weight is held as unsigned codes u plus per-block scales (and mins for asymmetric formats):
value = scale * (u - offset) - min, blocks of `block` values running along d_in (GGUF's blocks, transposed to
our [in, out] layout). Columns are grouped by 16 in the layout the native kernel reads
(kernels/quant_matmul.cc has the byte order and why):
    codes  [d_out / 16, d_in / 4, 64] uint8 (8-bit) or [d_out / 16, d_in / 8, 64] uint8 (two 4-bit per byte)
    scales [d_out / 16, d_in / block, 16] float16 (when exact, as GGUF's own) or float32 (K-quants' products)
    mins   like scales, or None
d_out is padded to a multiple of 16 with zero columns (shape keeps the true size).

The matmul: with the native kernels loaded (CPU, a C++ compiler), `kernels/quant_matmul.py` (its kernel,
kernels/quant_matmul.cc): activations
rounded to int8 per 32 values twice (x, then the residual; llama.cpp rounds once), integer dot products, one
pass over the weight bytes for up to 8 rows, column groups split over the cores on XLA's own thread pool
(kernels/parallel.h). Its error against dequantize-then-f32 is of float rounding's size (tests/test_quant.py).
Without the kernels (a GPU, no compiler, COREJAX_NATIVE=0): XLA dequantizes a slice of column groups at a time
inside lax.map and multiplies in f32: exact but slow on a CPU (XLA:CPU has no integer dot products), which is
why the kernel exists. docs/MEASUREMENTS.md has the figures.

Exactness of the weights: dequantize() computes scale * (u - offset) - min in float32 in ggml's order, so
GGUF blocks come back bit-identical to gguf.quants.dequantize.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from corejax.errors import InvalidParameterError
from corejax.hostmem import aligned_empty, to_device
from corejax.kernels import quant_matmul
from corejax.kernels.policy import current
from corejax.kernels.quant_matmul import GROUP
from corejax.weights.arena import device_empty

BLOCKS = (16, 32)  # values per scale the layout supports
_SLICE_BYTES = 512 * 1024
_CHUNK_ROWS = 8192  # rows repacked at a time by from_blocks (a multiple of GROUP)  # the XLA fallback's dequantized f32 slice: well inside L2


@struct.dataclass
class QuantArray:
    """A quantized [d_in, d_out] matrix. Arrays are pytree leaves; the rest is static (part of the jit key)."""

    codes: jax.Array
    scales: jax.Array
    mins: jax.Array | None
    shape: tuple[int, int] = struct.field(pytree_node=False)
    block: int = struct.field(pytree_node=False)  # values per scale along d_in
    bits: int = struct.field(pytree_node=False)  # 8 (a byte per code) or 4 (two per byte)
    offset: int = struct.field(pytree_node=False, default=0)  # value = scale * (u - offset) - min
    fmt: str = struct.field(pytree_node=False, default="")  # where it came from: "Q4_1", "int8", ...
    # The largest code u (8-bit layouts): codes <= 127 let the AVX2 kernel skip its sign trick and add pair
    # sums in int16 (kernels/isa.h); 255 is always safe.
    code_max: int = struct.field(pytree_node=False, default=255)

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in (self.codes, self.scales, self.mins) if a is not None)


def supported(shape: tuple[int, int], block: int) -> bool:
    """Whether a checkpoint [out, in] matrix with `block` values per scale fits the layout."""
    d_out, d_in = shape
    return block in BLOCKS and d_in % 32 == 0 and d_in % block == 0


def layout_bytes(shape: tuple[int, int], bits: int, block: int, scale_bytes: int, has_mins: bool) -> int:
    d_out, d_in = shape
    padded = -(-d_out // GROUP) * GROUP
    return padded * d_in * bits // 8 + padded * (d_in // block) * scale_bytes * (2 if has_mins else 1)


def _scale_array(x: np.ndarray) -> np.ndarray:
    """float16 when every value survives the round trip (GGUF's own f16 scales do), else float32."""
    half = x.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), x, equal_nan=True) else x.astype(np.float32)


def _group_params(a: np.ndarray) -> np.ndarray:
    """[out, in // block] (out a multiple of 16) -> [out / 16, in // block, 16]."""
    out, nb = a.shape
    grouped = aligned_empty((out // GROUP, nb, GROUP), a.dtype)
    grouped[...] = a.reshape(out // GROUP, GROUP, nb).transpose(0, 2, 1)
    return grouped


def _group_codes(u: np.ndarray, bits: int, out: np.ndarray | None = None) -> np.ndarray:
    """u [rows, in] uint8 (rows a multiple of 16) -> the kernel's byte order (module docstring), written to `out`
    ([rows / 16, in * bits / 32, 64]) when given."""
    rows, d_in = u.shape
    g = rows // GROUP
    per = d_in * bits // 32
    if out is None:
        out = aligned_empty((g, per, 64), np.uint8)
    view = out.reshape(g, per, GROUP, 4)
    if bits == 8:
        view[...] = u.reshape(g, GROUP, d_in // 4, 4).transpose(0, 2, 1, 3)
    else:
        split = u.reshape(g, GROUP, d_in // 8, 2, 4).transpose(0, 2, 3, 1, 4)  # [g, s, half, column, j]
        np.bitwise_or(split[:, :, 0], split[:, :, 1] << 4, out=view)
    return out


def from_blocks(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, *, fmt: str) -> QuantArray:
    """Checkpoint-order arrays -> QuantArray. codes [out, in] integers; scales/mins [out, in // block] f32,
    value = scales * code - mins."""
    d_out, d_in = codes.shape
    block = d_in // scales.shape[1]
    if not supported((d_out, d_in), block):
        raise InvalidParameterError(f"{fmt}: a [{d_out}, {d_in}] matrix with {block} values per scale does not "
                                    "fit the quantized layout (needs in % 32 == 0 and 16 or 32 per scale)")
    lo, hi = int(codes.min()), int(codes.max())
    offset = 0 if lo >= 0 else 1 << (-lo - 1).bit_length()  # a power of two: scale * offset stays exact
    if hi + offset > 255:
        raise InvalidParameterError(f"{fmt} codes span [{lo}, {hi}], more than a byte holds")
    bits = 4 if hi + offset < 16 else 8
    pad = -d_out % GROUP
    grouped = aligned_empty(((d_out + pad) // GROUP, d_in * bits // 32, 64), np.uint8)
    for r in range(0, d_out, _CHUNK_ROWS):  # a chunk at a time: no full-size temporary (a 262k-row embedding)
        rows = codes[r:r + _CHUNK_ROWS]
        u = np.zeros((-(-len(rows) // GROUP) * GROUP, d_in), np.uint8)
        np.add(rows, offset, out=u[:len(rows)], dtype=np.int16, casting="unsafe")
        _group_codes(u, bits, grouped[r // GROUP:(r + len(u)) // GROUP])
    sc = np.pad(_scale_array(scales), ((0, pad), (0, 0)))
    mn = None if mins is None else np.pad(_scale_array(mins), ((0, pad), (0, 0)))
    if mn is not None and mn.dtype != sc.dtype:
        sc, mn = sc.astype(np.float32), mn.astype(np.float32)
    return QuantArray(
        codes=to_device(grouped),
        scales=to_device(_group_params(sc)),
        mins=None if mn is None else to_device(_group_params(mn)),
        shape=(d_in, d_out), block=block, bits=bits, offset=offset, fmt=fmt, code_max=hi + offset,
    )


def from_ggml(raw: np.ndarray, d_in: int, fmt: str, into: Callable | None = None) -> QuantArray | None:
    """A GGUF tensor's block bytes [out, row_bytes] (Q4_0, Q4_1, Q8_0) -> the QuantArray from_blocks makes of its
    unpacked codes, byte for byte, in one native pass (kernels/ggml_repack.cc); None where that path cannot
    serve (no native library, another format, a Q8_0 tensor whose codes fit 4 bits) and from_blocks must.
    into(shapes) -> writable views or None: where to write the leaves (a layer's slots of stacked arrays,
    hostmem.Arena); the QuantArray then holds those views until the layers are stacked."""
    from corejax.kernels import ggml_repack

    d_out = raw.shape[0]
    span = ggml_repack.code_range(raw, fmt, d_in)
    if span is None or not supported((d_out, d_in), 32):
        return None
    lo, hi = span
    offset = 0 if lo >= 0 else 1 << (-lo - 1).bit_length()
    bits = 4 if hi + offset < 16 else 8
    if (bits == 4) != (fmt != "Q8_0") or hi + offset > 255:
        return None
    groups = -(-d_out // GROUP)
    shapes = [((groups, d_in * bits // 32, 64), np.uint8), ((groups, d_in // 32, GROUP), np.float16)]
    if fmt == "Q4_1":
        shapes.append(shapes[1])
    slots = into(shapes) if into is not None else None
    if slots is not None:
        slots = list(slots) + [None] * (3 - len(slots))
        if not ggml_repack.repack(raw, fmt, d_in, offset, bits, *slots):
            return None
        return QuantArray(codes=slots[0], scales=slots[1], mins=slots[2], shape=(d_in, d_out), block=32, bits=bits,
                          offset=offset, fmt=fmt, code_max=hi + offset)
    # Written in place where the device is this process's memory (no host copy to move), else on the host.
    made = [device_empty(shape, dtype) for shape, dtype in shapes]
    if any(m is None for m in made):
        made = [(None, aligned_empty(shape, dtype)) for shape, dtype in shapes]
    views = [view for _, view in made] + [None] * (3 - len(made))
    if not ggml_repack.repack(raw, fmt, d_in, offset, bits, *views):
        return None
    arrays = [dst if dst is not None else to_device(view) for dst, view in made] + [None] * (3 - len(made))
    return QuantArray(codes=arrays[0], scales=arrays[1], mins=arrays[2], shape=(d_in, d_out), block=32, bits=bits,
                      offset=offset, fmt=fmt, code_max=hi + offset)


def quantize(w: np.ndarray, bits: int, *, block: int = 32) -> QuantArray:
    """Quantizes a float checkpoint-order weight [out, in]: int8 symmetric (as Q8_0) or int4 with a
    per-block min (as Q4_1), round-to-nearest with block scales."""
    if bits not in (4, 8):
        raise InvalidParameterError(f"weights can be quantized to 8 or 4 bits; got {bits}")
    w = np.asarray(w, np.float32)
    d_out, d_in = w.shape
    if d_in % block:
        raise InvalidParameterError(f"a [{d_out}, {d_in}] weight cannot be split into blocks of {block}")
    b = w.reshape(d_out, d_in // block, block)
    if bits == 8:
        scale = np.abs(b).max(-1) / 127.0
        safe = np.where(scale == 0, 1.0, scale)
        codes = np.clip(np.rint(b / safe[..., None]), -127, 127).astype(np.int8)
        scale = scale.astype(np.float16).astype(np.float32)  # stored as f16, like Q8_0
        return from_blocks(codes.reshape(d_out, d_in), scale, None, fmt="int8")
    lo, hi = b.min(-1), b.max(-1)
    scale = ((hi - lo) / 15.0).astype(np.float16).astype(np.float32)
    low = lo.astype(np.float16).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale)
    codes = np.clip(np.rint((b - low[..., None]) / safe[..., None]), 0, 15).astype(np.int8)
    return from_blocks(codes.reshape(d_out, d_in), scale, -low, fmt="int4")


def _unpack(codes: jax.Array, w: QuantArray) -> jax.Array:
    """[..., S, C, 4] stored bytes (C columns of a group) -> [..., d_in, C] codes as float32, u - offset."""
    lead, cols = codes.shape[:-3], codes.shape[-2]
    if w.bits == 8:
        u = jnp.swapaxes(codes, -1, -2)  # [..., S, 4, 16]: k = 4 s + j
    else:
        halves = jnp.stack([codes & 0x0F, codes >> 4], axis=-3)  # [..., S, 2, 16, 4]: k = 8 s + 4 h + j
        u = jnp.swapaxes(halves, -1, -2)
    u = u.reshape(*lead, w.shape[0], cols).astype(jnp.float32)
    return u - w.offset if w.offset else u


def _dequant_groups(codes: jax.Array, scales: jax.Array, mins: jax.Array | None, w: QuantArray) -> jax.Array:
    """Groups [..., S, 64] -> [..., d_in, 16] float32, in ggml's order: scale * code - min."""
    c = _unpack(codes.reshape(*codes.shape[:-1], GROUP, 4), w)
    lead = c.shape[:-2]
    c = c.reshape(*lead, w.shape[0] // w.block, w.block, GROUP)
    v = c * scales.astype(jnp.float32)[..., :, None, :]
    if mins is not None:
        v = v - mins.astype(jnp.float32)[..., :, None, :]
    return v.reshape(*lead, w.shape[0], GROUP)


def matmul(x: jax.Array, w: QuantArray, layer: jax.Array | int | None = None) -> jax.Array:
    """x [..., d_in] @ w -> [..., d_out] float32. A stacked w (arrays with a leading layer axis, a model's layers
    of one layout; corejax/models/stack.py) takes `layer`, an int32 index the kernel reads in place."""
    d_in, d_out = w.shape
    stacked = w.codes.ndim == 4
    if stacked != (layer is not None):
        raise ValueError(f"quant.matmul: a stacked weight needs a layer index and only it takes one: "
                         f"{w.codes.shape=} {layer=}")
    if x.shape[-1] != d_in:
        raise ValueError(f"quant.matmul: {x.shape=} does not match the weight's [in, out] = {w.shape}")
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, d_in).astype(jnp.float32)
    if current().native:  # the kernel policy of the program being traced (kernels/policy.py)
        y = quant_matmul.quant_matmul(x2, w.codes, w.scales, w.mins, layer, bits=w.bits, block=w.block,
                                      offset=w.offset, code_max=w.code_max)
    else:
        y = _xla_matmul(x2, w if layer is None else jax.tree.map(lambda a: a[layer], w))
    return y[:, :d_out].reshape(*lead, d_out)


def _xla_matmul(x2: jax.Array, w: QuantArray) -> jax.Array:
    """The fallback: lax.map over slices of column groups, each dequantized (cache-sized) then multiplied."""
    groups = w.codes.shape[0]
    per = max(1, min(groups, _SLICE_BYTES // (4 * w.shape[0] * GROUP)))
    while groups % per:
        per -= 1
    split = lambda a: None if a is None else a.reshape(groups // per, per, *a.shape[1:])

    def one_slice(parts):
        codes, scales, mins = parts
        dense = _dequant_groups(codes, scales, mins, w)  # [per, d_in, 16]
        return jnp.einsum("mk,gkc->mgc", x2, dense, preferred_element_type=jnp.float32)

    out = lax.map(one_slice, (split(w.codes), split(w.scales), split(w.mins)))  # [T, M, per, 16]
    return jnp.moveaxis(out, 0, 1).reshape(x2.shape[0], groups * GROUP)


def take_columns(w: QuantArray, ids: jax.Array) -> jax.Array:
    """Columns `ids` [...] of w, dequantized -> [..., d_in] float32 (a tied embedding's lookup)."""
    g, c = ids // GROUP, ids % GROUP
    grp = w.codes[g].reshape(*ids.shape, -1, GROUP, 4)  # [..., S, 16, 4]
    own = jnp.take_along_axis(grp, c[..., None, None, None], axis=-2)  # [..., S, 1, 4]
    u = _unpack(own, w)[..., 0]  # [..., d_in]
    sc = jnp.take_along_axis(w.scales[g], c[..., None, None], axis=-1)[..., 0]  # [..., d_in / block]
    v = u.reshape(*ids.shape, -1, w.block) * sc.astype(jnp.float32)[..., None]
    if w.mins is not None:
        mn = jnp.take_along_axis(w.mins[g], c[..., None, None], axis=-1)[..., 0]
        v = v - mn.astype(jnp.float32)[..., None]
    return v.reshape(*ids.shape, w.shape[0])


def dequantize(w: QuantArray) -> jax.Array:
    """The whole matrix as float32 [d_in, d_out] (tests and debugging; never on the hot path)."""
    full = _dequant_groups(w.codes, w.scales, w.mins, w)  # [G, d_in, 16]
    return jnp.moveaxis(full, 0, 1).reshape(w.shape[0], -1)[:, :w.shape[1]]
