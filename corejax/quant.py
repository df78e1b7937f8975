"""QuantArray: weights kept quantized in memory, and the one matmul that understands them.

A [D_in, D_out] weight is stored as integer codes plus per-block scales (and mins for asymmetric formats),
with value = scales * code - mins, blocks running along D_in (GGUF's blocks, transposed to our [in, out]
layout). Codes are tiled by output columns — codes [T, D_in, tile] — so one tile is contiguous.

Why tiles (measured on this 2-core AMD EPYC, jax 0.10.2, one [2048, 16384] GEMV, min of 5x10 calls):
  f32 weights, x @ W                                   4.5-7.5 ms   (reads 134 MB)
  int8 dequantized inside one fused expression        38-62 ms     (XLA materialises float weights)
  int8 x int8 -> int32 lax.dot / bf16 dot              55-66 ms     (XLA:CPU has no fast int8/bf16 GEMM)
  int8, lax.map over 256-column tiles: dequantize a
  [D_in, tile] f32 tile (cache-resident), then dot      6.3-6.6 ms   (reads 34 MB)
The tiled form runs at f32 speed on one large matrix while holding 4x (int8) to ~6x (packed int4) fewer
bytes; XLA flags (--xla_cpu_use_onednn, --xla_cpu_use_xnnpack) made every variant slower. Inside a whole
model it does not hold: SmolLM2-135M Q4_1 kept quantized (96.6 MB of weights vs 538 MB f32) decodes at
2.7 tok/s vs 15.3 tok/s for f32 in the same run — with many small matrices, XLA:CPU emits slow code for
the dequantize-then-dot pairs (a scan over 30 such pairs: 37 ms; 30 separate pairs: 110-120 ms; the f32
dots: 5 ms). So "native" weights are an opt-in memory saver, not the default. Beating f32 *speed* needs
integer dot products (AVX-512 VNNI, as llama.cpp uses) that XLA:CPU does not emit: the next path is an
XLA FFI custom call with a hand-written GEMV, or a Pallas CPU backend when one exists.

Exactness: the tile is dequantized with the same float32 operations, in the same order, as
gguf.quants.dequantize, so a GGUF model computes with bit-identical weight values whether it is
dequantized at load or kept quantized; only the summation order of the matmul differs.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from corejax.errors import InvalidParameterError

_TILE_BYTES = 512 * 1024  # one dequantized f32 tile: well inside L2 of the cores measured


@struct.dataclass
class QuantArray:
    """A quantized [d_in, d_out] matrix. Arrays are pytree leaves; the rest is static (part of the jit key).

    codes:  [T, d_in, tile] int8, or [T, d_in // 2, tile] uint8 with two 4-bit codes per byte (rows 2j in
            the low nibble, 2j+1 in the high one)
    scales: [T, d_in // block, tile] float16 (when exact) or float32
    mins:   like scales, or None for symmetric formats
    """

    codes: jax.Array
    scales: jax.Array
    mins: jax.Array | None
    shape: tuple[int, int] = struct.field(pytree_node=False)
    block: int = struct.field(pytree_node=False)  # values per scale along d_in
    bits: int = struct.field(pytree_node=False)  # 8 (one code per int8) or 4 (packed)
    offset: int = struct.field(pytree_node=False, default=0)  # code = stored nibble - offset (4-bit only)
    fmt: str = struct.field(pytree_node=False, default="")  # where it came from: "Q4_1", "int8", ...

    @property
    def tile(self) -> int:
        return self.codes.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in (self.codes, self.scales, self.mins) if a is not None)


def choose_tile(d_in: int, d_out: int) -> int:
    """The divisor of d_out (a multiple of 8 where possible) nearest below the cache-sized target."""
    target = max(8, _TILE_BYTES // (4 * d_in))
    best = d_out
    for t in range(min(target, d_out), 0, -1):
        if d_out % t == 0 and (t % 8 == 0 or t == d_out):
            best = t
            break
    return best


def _scale_array(x: np.ndarray) -> np.ndarray:
    """float16 when every value survives the round trip (GGUF's own f16 scales do), else float32."""
    half = x.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), x, equal_nan=True) else x.astype(np.float32)


def _tiles(a: np.ndarray, tile: int) -> np.ndarray:
    """[out, X] (checkpoint order) -> [out // tile, X, tile] contiguous."""
    out, x = a.shape
    return np.ascontiguousarray(a.reshape(out // tile, tile, x).transpose(0, 2, 1))


def from_blocks(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, *, fmt: str,
                tile: int | None = None) -> QuantArray:
    """Checkpoint-order arrays -> QuantArray. codes [out, in] integers; scales/mins [out, in // block] f32."""
    d_out, d_in = codes.shape
    block = d_in // scales.shape[1]
    tile = tile or choose_tile(d_in, d_out)
    lo, hi = int(codes.min()), int(codes.max())
    if hi - lo < 16 and d_in % 2 == 0:
        offset = -lo  # nibble = code - lo, in [0, 15]
        nib = (codes.astype(np.int16) + offset).astype(np.uint8)
        packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
        stored, bits = _tiles(packed, tile), 4
    else:
        if lo < -128 or hi > 127:
            raise InvalidParameterError(f"{fmt} codes span [{lo}, {hi}], more than int8 holds")
        stored, bits, offset = _tiles(codes.astype(np.int8), tile), 8, 0
    return QuantArray(
        codes=jnp.asarray(stored),
        scales=jnp.asarray(_tiles(_scale_array(scales), tile)),
        mins=None if mins is None else jnp.asarray(_tiles(_scale_array(mins), tile)),
        shape=(d_in, d_out), block=block, bits=bits, offset=offset, fmt=fmt,
    )


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


def _codes_f32(codes: jax.Array, w: QuantArray) -> jax.Array:
    """[..., rows, tile] stored codes -> [..., d_in, tile] float32 codes."""
    if w.bits == 8:
        return codes.astype(jnp.float32)
    low = (codes & 0x0F).astype(jnp.float32)
    high = (codes >> 4).astype(jnp.float32)
    both = jnp.stack([low, high], axis=-2)  # [..., d_in/2, 2, tile]
    out = both.reshape(*codes.shape[:-2], codes.shape[-2] * 2, codes.shape[-1])
    return out - w.offset if w.offset else out


def _dequant(codes: jax.Array, scales: jax.Array, mins: jax.Array | None, w: QuantArray) -> jax.Array:
    """One tile (or a stack of them): [..., rows, tile] -> [..., d_in, tile] float32, in ggml's order."""
    c = _codes_f32(codes, w)
    lead, tile = c.shape[:-2], c.shape[-1]
    nb = w.shape[0] // w.block
    c = c.reshape(*lead, nb, w.block, tile)
    v = c * scales.astype(jnp.float32)[..., :, None, :]
    if mins is not None:
        v = v - mins.astype(jnp.float32)[..., :, None, :]
    return v.reshape(*lead, w.shape[0], tile)


def matmul(x: jax.Array, w: QuantArray) -> jax.Array:
    """x [..., d_in] @ w -> [..., d_out] float32, one cache-sized dequantized tile at a time."""
    d_in, d_out = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in).astype(jnp.float32)

    def one_tile(parts):
        codes, scales, mins = parts
        return jnp.dot(x2, _dequant(codes, scales, mins, w), preferred_element_type=jnp.float32)

    out = lax.map(one_tile, (w.codes, w.scales, w.mins))  # [T, M, tile]
    return jnp.moveaxis(out, 0, 1).reshape(*lead, d_out)


def take_columns(w: QuantArray, ids: jax.Array) -> jax.Array:
    """Columns `ids` [...] of w, dequantized -> [..., d_in] float32 (a tied embedding's lookup)."""
    t, c = ids // w.tile, ids % w.tile
    codes = w.codes[t, :, c][..., None]  # [..., rows, 1]
    scales = w.scales[t, :, c][..., None]
    mins = None if w.mins is None else w.mins[t, :, c][..., None]
    return _dequant(codes, scales, mins, w)[..., 0]


def dequantize(w: QuantArray) -> jax.Array:
    """The whole matrix as float32 [d_in, d_out] (tests and debugging; never on the hot path)."""
    full = _dequant(w.codes, w.scales, w.mins, w)  # [T, d_in, tile]
    return jnp.moveaxis(full, 0, 1).reshape(w.shape)
