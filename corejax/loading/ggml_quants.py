"""GGML tensor types: block layouts, numpy unpackers into integer codes + scales, and dequantization."""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable

import numpy as np

from corejax.errors import InvalidParameterError, UnsupportedModelError

QK_K = 256  # elements per K-quant super-block


class GGMLType(enum.IntEnum):
    """The ggml tensor type ids as GGUF files store them (ggml.h `enum ggml_type`)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    # 31-33 and 36-38 are the ARM repacked layouts that ggml removed in 2024; old files still carry them.
    Q4_0_4_4 = 31
    Q4_0_4_8 = 32
    Q4_0_8_8 = 33
    TQ1_0 = 34
    TQ2_0 = 35
    IQ4_NL_4_4 = 36
    IQ4_NL_4_8 = 37
    IQ4_NL_8_8 = 38
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


# (elements per block, bytes per block), as ggml's type traits define them.
BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q8_1: (32, 4 + 4 + 32),
    GGMLType.Q2_K: (256, 2 + 2 + QK_K // 16 + QK_K // 4),
    GGMLType.Q3_K: (256, 2 + QK_K // 4 + QK_K // 8 + 12),
    GGMLType.Q4_K: (256, 2 + 2 + QK_K // 2 + 12),
    GGMLType.Q5_K: (256, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    GGMLType.Q6_K: (256, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    GGMLType.Q8_K: (256, 4 + QK_K + QK_K // 8),
    GGMLType.IQ2_XXS: (256, 2 + QK_K // 4),
    GGMLType.IQ2_XS: (256, 2 + QK_K // 4 + QK_K // 32),
    GGMLType.IQ3_XXS: (256, 2 + QK_K // 4 + QK_K // 8),
    GGMLType.IQ1_S: (256, 2 + QK_K // 8 + QK_K // 16),
    GGMLType.IQ4_NL: (32, 2 + 16),
    GGMLType.IQ3_S: (256, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    GGMLType.IQ2_S: (256, 2 + QK_K // 4 + QK_K // 16),
    GGMLType.IQ4_XS: (256, 2 + 2 + QK_K // 2 + QK_K // 64),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, QK_K // 8 + QK_K // 16 + QK_K // 32),
    GGMLType.BF16: (1, 2),
    GGMLType.Q4_0_4_4: (32, 2 + 16),
    GGMLType.Q4_0_4_8: (32, 2 + 16),
    GGMLType.Q4_0_8_8: (32, 2 + 16),
    GGMLType.TQ1_0: (256, 2 + 4 * 13),
    GGMLType.TQ2_0: (256, 2 + 64),
    GGMLType.IQ4_NL_4_4: (32, 2 + 16),
    GGMLType.IQ4_NL_4_8: (32, 2 + 16),
    GGMLType.IQ4_NL_8_8: (32, 2 + 16),
    GGMLType.MXFP4: (32, 1 + 16),
    GGMLType.NVFP4: (64, 4 + 32),
    GGMLType.Q1_0: (128, 2 + 16),
}


@dataclasses.dataclass(frozen=True)
class QuantBlocks:
    """Unpacked quantized blocks: value = scales[b, s] * codes[b, s * sub + i] - mins[b, s].

    For Q4_1/Q5_1, whose blocks store an additive minimum m, `mins` holds -m; x - (-m) rounds exactly
    like x + m, so dequantizing from this form stays bit-exact with ggml.
    """

    codes: np.ndarray  # [n_blocks, block_size] int8 (signed formats) or uint8
    scales: np.ndarray  # [n_blocks, n_sub] float32
    mins: np.ndarray | None  # [n_blocks, n_sub] float32, or None for symmetric formats


def _f16(field: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n, 1] float32."""
    return field.view("<f2").astype(np.float32)


_NIBBLE_SHIFT = np.array([0, 4], dtype=np.uint8)
_CRUMB_SHIFT = np.array([0, 2, 4, 6], dtype=np.uint8)
_BIT_SHIFT = np.arange(8, dtype=np.uint8)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """[n, 16] packed nibbles -> [n, 32] uint8; low nibbles are elements 0-15, high nibbles 16-31."""
    n = qs.shape[0]
    return ((qs.reshape(n, 1, 16) >> _NIBBLE_SHIFT.reshape(1, 2, 1)) & 0x0F).reshape(n, 32)


def unpack_q4_0(blocks: np.ndarray) -> QuantBlocks:
    codes = _nibbles_32(blocks[:, 2:]).view(np.int8) - np.int8(8)
    return QuantBlocks(codes, _f16(blocks[:, :2]), None)


def unpack_q4_1(blocks: np.ndarray) -> QuantBlocks:
    return QuantBlocks(_nibbles_32(blocks[:, 4:]), _f16(blocks[:, :2]), -_f16(blocks[:, 2:4]))


def _q5_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    # qh is a little-endian uint32 whose bit j is the fifth bit of element j.
    high = np.unpackbits(qh, axis=-1, bitorder="little")
    return _nibbles_32(qs) | (high << 4)


def unpack_q5_0(blocks: np.ndarray) -> QuantBlocks:
    codes = _q5_codes(blocks[:, 2:6], blocks[:, 6:]).view(np.int8) - np.int8(16)
    return QuantBlocks(codes, _f16(blocks[:, :2]), None)


def unpack_q5_1(blocks: np.ndarray) -> QuantBlocks:
    codes = _q5_codes(blocks[:, 4:8], blocks[:, 8:])
    return QuantBlocks(codes, _f16(blocks[:, :2]), -_f16(blocks[:, 2:4]))


def unpack_q8_0(blocks: np.ndarray) -> QuantBlocks:
    return QuantBlocks(blocks[:, 2:].view(np.int8), _f16(blocks[:, :2]), None)


def unpack_q8_k(blocks: np.ndarray) -> QuantBlocks:
    # The trailing 16 int16 block sums are a matmul shortcut, redundant for dequantization.
    scales = blocks[:, :4].view("<f4").astype(np.float32)
    return QuantBlocks(blocks[:, 4 : 4 + QK_K].view(np.int8), scales, None)


def unpack_q2_k(blocks: np.ndarray) -> QuantBlocks:
    n = blocks.shape[0]
    sc, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    codes = ((qs.reshape(n, 2, 1, 32) >> _CRUMB_SHIFT.reshape(1, 1, 4, 1)) & 3).reshape(n, QK_K)
    return QuantBlocks(codes, d * (sc & 0x0F).astype(np.float32), dmin * (sc >> 4).astype(np.float32))


def unpack_q3_k(blocks: np.ndarray) -> QuantBlocks:
    n = blocks.shape[0]
    hmask, qs, packed, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _f16(blocks[:, 108:110])
    # 16 six-bit scales: low nibbles in bytes 0-7, high crumbs in bytes 8-11 (ggml-quants.c).
    low = (packed[:, :8].reshape(n, 1, 8) >> _NIBBLE_SHIFT.reshape(1, 2, 1)).reshape(n, 16) & 0x0F
    high = (packed[:, 8:].reshape(n, 1, 4) >> _CRUMB_SHIFT.reshape(1, 4, 1)).reshape(n, 16) & 0x03
    sc = (low | (high << 4)).view(np.int8) - np.int8(32)
    ql = ((qs.reshape(n, 2, 1, 32) >> _CRUMB_SHIFT.reshape(1, 1, 4, 1)) & 3).reshape(n, QK_K)
    qh = ((hmask.reshape(n, 1, 32) >> _BIT_SHIFT.reshape(1, 8, 1)) & 1).reshape(n, QK_K)
    # A clear hmask bit means "subtract 4": ggml stores the high bit inverted.
    codes = ql.view(np.int8) - ((qh ^ 1) << 2).view(np.int8)
    return QuantBlocks(codes, d * sc.astype(np.float32), None)


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, 12] -> two [n, 8] uint8: the 6-bit scales and mins of Q4_K/Q5_K (get_scale_min_k4)."""
    n = packed.shape[0]
    p = packed.reshape(n, 3, 4)
    d, m, md = p[:, 0], p[:, 1], p[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 128] -> [n, 256]: each 32-byte chunk holds two sub-blocks, low nibbles first."""
    n = qs.shape[0]
    return ((qs.reshape(n, 4, 1, 32) >> _NIBBLE_SHIFT.reshape(1, 1, 2, 1)) & 0x0F).reshape(n, QK_K)


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    return d * sc.astype(np.float32), dmin * mn.astype(np.float32)


def unpack_q4_k(blocks: np.ndarray) -> QuantBlocks:
    scales, mins = _k_scales(blocks)
    return QuantBlocks(_k_nibbles(blocks[:, 16:]), scales, mins)


def unpack_q5_k(blocks: np.ndarray) -> QuantBlocks:
    n = blocks.shape[0]
    scales, mins = _k_scales(blocks)
    qh = ((blocks[:, 16:48].reshape(n, 1, 32) >> _BIT_SHIFT.reshape(1, 8, 1)) & 1).reshape(n, QK_K)
    return QuantBlocks(_k_nibbles(blocks[:, 48:]) | (qh << 4), scales, mins)


def unpack_q6_k(blocks: np.ndarray) -> QuantBlocks:
    n = blocks.shape[0]
    ql, qh, sc, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], _f16(blocks[:, 208:210])
    low = ((ql.reshape(n, 2, 1, 64) >> _NIBBLE_SHIFT.reshape(1, 1, 2, 1)) & 0x0F).reshape(n, QK_K)
    high = ((qh.reshape(n, 2, 1, 32) >> _CRUMB_SHIFT.reshape(1, 1, 4, 1)) & 0x03).reshape(n, QK_K)
    codes = (low | (high << 4)).view(np.int8) - np.int8(32)
    return QuantBlocks(codes, d * sc.view(np.int8).astype(np.float32), None)


UNPACKERS: dict[GGMLType, Callable[[np.ndarray], QuantBlocks]] = {
    GGMLType.Q4_0: unpack_q4_0,
    GGMLType.Q4_1: unpack_q4_1,
    GGMLType.Q5_0: unpack_q5_0,
    GGMLType.Q5_1: unpack_q5_1,
    GGMLType.Q8_0: unpack_q8_0,
    GGMLType.Q2_K: unpack_q2_k,
    GGMLType.Q3_K: unpack_q3_k,
    GGMLType.Q4_K: unpack_q4_k,
    GGMLType.Q5_K: unpack_q5_k,
    GGMLType.Q6_K: unpack_q6_k,
    GGMLType.Q8_K: unpack_q8_k,
}

_FLOAT_TYPES = {GGMLType.F32: "<f4", GGMLType.F16: "<f2", GGMLType.BF16: "<u2"}

SUPPORTED_TYPES: frozenset[GGMLType] = frozenset(UNPACKERS) | frozenset(_FLOAT_TYPES)

# Blocks per vectorised step: big enough that numpy's per-call overhead vanishes, small enough that
# the float32 temporaries stay in cache-sized tens of MB rather than several GB for a 262144-row vocab.
_CHUNK_BLOCKS = 1 << 15


def dequantize_blocks(q: QuantBlocks, out: np.ndarray | None = None) -> np.ndarray:
    """QuantBlocks -> [n_blocks, block_size] float32 (into `out` if given); operations in ggml's order."""
    n, n_sub = q.scales.shape
    if out is None:
        out = np.empty(q.codes.shape, dtype=np.float32)
    view = out.reshape(n, n_sub, -1)
    np.multiply(q.scales.reshape(n, n_sub, 1), q.codes.reshape(n, n_sub, -1), out=view, dtype=np.float32)
    if q.mins is not None:
        view -= q.mins.reshape(n, n_sub, 1)
    return out


def tensor_nbytes(ggml_type: GGMLType, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` (numpy order: last axis contiguous) occupies; ValueError if rows split a block."""
    block, type_size = BLOCK_SIZES[ggml_type]
    if not shape or shape[-1] % block:
        raise ValueError(f"{ggml_type.name} rows must hold whole blocks of {block} elements, got {shape=}")
    n = 1
    for dim in shape:
        n *= dim
    return n // block * type_size


def dequantize(data: np.ndarray, ggml_type: GGMLType | int, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 bytes of one tensor -> float32 array of `shape` (numpy order).

    F32 data comes back as a read-only zero-copy view when `data` is one; everything else is a new array.
    """
    ggml_type = GGMLType(ggml_type)
    shape = tuple(int(d) for d in shape)
    if ggml_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"corejax cannot dequantize ggml type {ggml_type.name}; "
            f"use a file quantized to one of {', '.join(sorted(t.name for t in SUPPORTED_TYPES))}"
        )
    nbytes = tensor_nbytes(ggml_type, shape)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.size != nbytes:
        raise ValueError(f"{ggml_type.name} {shape=} needs {nbytes} uint8 bytes, got {data.dtype=} {data.size=}")
    data = data.reshape(-1)
    if ggml_type == GGMLType.F32:
        return data.view("<f4").reshape(shape)
    if ggml_type == GGMLType.F16:
        return data.view("<f2").astype(np.float32).reshape(shape)
    if ggml_type == GGMLType.BF16:
        return (data.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    block, type_size = BLOCK_SIZES[ggml_type]
    blocks = data.reshape(-1, type_size)
    unpack = UNPACKERS[ggml_type]
    out = np.empty((blocks.shape[0], block), dtype=np.float32)
    # Hostile scales (inf, NaN) are data, not errors: the result carries them without warnings.
    with np.errstate(all="ignore"):
        for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
            stop = start + _CHUNK_BLOCKS
            dequantize_blocks(unpack(blocks[start:stop]), out=out[start:stop])
    return out.reshape(shape)


# ----------------------------------------------------------------------------------------------------
# Encoding: llama.cpp's reference quantizers (ggml-quants.c quantize_row_q8_0_ref, q4_0_ref, q4_1_ref),
# vectorised over blocks of 32 and bit-exact with gguf-py's gguf.quants.quantize (tests/test_quantize.py).

QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1")
# "int8"/"int4" mean what weights="int8"/"int4" mean when a model loads (corejax/weights/quant.py): Q8_0, and 4-bit
# codes with a scale and a minimum per 32 weights, which is Q4_1.
_ALIASES = {"int8": "Q8_0", "q8_0": "Q8_0", "int4": "Q4_1", "q4_0": "Q4_0", "q4_1": "Q4_1"}
QK = 32  # values per block
_BYTES_PER_BLOCK = {"Q8_0": 2 + QK, "Q4_0": 2 + QK // 2, "Q4_1": 4 + QK // 2}
_ENCODE_CHUNK = 1 << 16  # blocks per vectorised step: bounded float32 temporaries (8 MiB) on any tensor


def _roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf (half away from zero) in float32; floor(|x| + 0.5) would round 0.49999997 up."""
    a = np.abs(x)
    f = np.floor(a)
    return np.copysign(f + (a - f >= 0.5), x)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """[n, 1] float32 -> [n, 2] uint8, little-endian IEEE half (ggml's GGML_FP32_TO_FP16: round to nearest)."""
    return x.astype("<f2").view(np.uint8)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] uint8 in [0, 15] -> [n, 16]: element j in the low nibble of byte j, element j + 16 in its high."""
    return q[:, :QK // 2] | (q[:, QK // 2:] << np.uint8(4))


def bytes_per_block(qtype: str) -> int:
    return _BYTES_PER_BLOCK[qtype]


def quantize_blocks(x: np.ndarray, qtype: str) -> np.ndarray:
    """[n, 32] float32 blocks -> [n, bytes per block] uint8 in ggml's layout for `qtype`."""
    x = np.asarray(x, np.float32)
    if qtype == "Q8_0":
        d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
        q = _roundf(x * _inverse(d)).astype(np.int8).view(np.uint8)
        return np.concatenate([_f16_bytes(d), q], axis=1)
    if qtype == "Q4_0":
        # The signed value of largest magnitude (the first one, as ggml's strict `<` keeps) maps to -8.
        big = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
        d = big / np.float32(-8)
        q = np.minimum(np.trunc(x * _inverse(d) + np.float32(8.5)), 15).astype(np.uint8)
        return np.concatenate([_f16_bytes(d), _nibbles(q)], axis=1)
    if qtype == "Q4_1":
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        d = (hi - lo) / np.float32(15)
        q = np.minimum(np.trunc((x - lo) * _inverse(d) + np.float32(0.5)), 15).astype(np.uint8)
        return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _nibbles(q)], axis=1)
    raise InvalidParameterError(f"quantization type must be one of {', '.join(QUANT_TYPES)}; got {qtype!r}")


def quantize_tensor(w: np.ndarray, qtype: str) -> np.ndarray:
    """A float [..., in] tensor (in % 32 == 0) -> uint8 [..., in // 32 * bytes per block], ggml's row layout."""
    w = np.asarray(w, np.float32)
    if qtype not in QUANT_TYPES:
        raise InvalidParameterError(f"quantization type must be one of {', '.join(QUANT_TYPES)}; got {qtype!r}")
    if w.shape[-1] % QK:
        raise InvalidParameterError(f"rows of {w.shape[-1]} values do not split into blocks of {QK}")
    blocks = w.reshape(-1, QK)
    out = np.empty((blocks.shape[0], _BYTES_PER_BLOCK[qtype]), np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, blocks.shape[0], _ENCODE_CHUNK):
            out[start:start + _ENCODE_CHUNK] = quantize_blocks(blocks[start:start + _ENCODE_CHUNK], qtype)
    return out.reshape(*w.shape[:-1], -1)


def normalize_type(qtype: str) -> str:
    """"Q8_0" | "Q4_0" | "Q4_1", also from "int8" (Q8_0) and "int4" (Q4_1), any case."""
    name = _ALIASES.get(str(qtype).lower(), str(qtype).upper())
    if name not in QUANT_TYPES:
        raise InvalidParameterError(
            f"quantization type must be one of {', '.join(QUANT_TYPES)} (or int8 = Q8_0, int4 = Q4_1); got {qtype!r}")
    return name
