"""Builds GGUF files byte by byte, valid or with any single field broken, for the reader's tests."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

# GGUF metadata value type ids.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_FMT = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
        BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """One metadata entry with an already-encoded value."""
    return gstr(key) + u32(vtype) + payload


def scalar(vtype: int, value) -> bytes:
    return struct.pack(_FMT[vtype], value)


def kv_scalar(key: str, vtype: int, value) -> bytes:
    return kv(key, vtype, scalar(vtype, value))


def kv_str(key: str, value: str | bytes) -> bytes:
    return kv(key, STRING, gstr(value))


def array(itype: int, items: list) -> bytes:
    """An array value (element type, count, items); items are Python values, or bytes for nested arrays."""
    if itype == STRING:
        body = b"".join(gstr(s) for s in items)
    elif itype == ARRAY:
        body = b"".join(items)
    else:
        body = b"".join(scalar(itype, v) for v in items)
    return u32(itype) + u64(len(items)) + body


def kv_array(key: str, itype: int, items: list) -> bytes:
    return kv(key, ARRAY, array(itype, items))


@dataclasses.dataclass
class Tensor:
    name: str | bytes
    dims: list[int]  # GGUF order: innermost first
    ggml_type: int
    data: bytes
    offset: int | None = None  # relative to the data section; None packs tensors in order, aligned


def build(
    kvs: list[bytes],
    tensors: list[Tensor],
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    alignment: int = 32,
) -> bytes:
    """A GGUF file; counts default to the true ones, `alignment` only pads (set general.alignment via kvs)."""
    head = magic + u32(version)
    head += u64(len(tensors) if n_tensors is None else n_tensors)
    head += u64(len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs)
    infos, data, cursor = b"", bytearray(), 0
    for t in tensors:
        offset = cursor if t.offset is None else t.offset
        infos += gstr(t.name) + u32(len(t.dims)) + b"".join(u64(d) for d in t.dims)
        infos += u32(t.ggml_type) + u64(offset)
        end = offset + len(t.data)
        if end > 1 << 24:
            continue  # a deliberately absurd offset: its data is simply absent
        if len(data) < end:
            data.extend(bytes(end - len(data)))
        data[offset:end] = t.data
        cursor = -(-end // alignment) * alignment
    out = head + infos
    out += bytes(-len(out) % alignment)
    return out + bytes(data)


def finite_blocks(rng: np.random.Generator, ggml_type: str, n_blocks: int) -> np.ndarray:
    """[n_blocks, type_size] random uint8 blocks whose float scale fields are finite, moderate values."""
    from corejax.loading.ggml_quants import BLOCK_SIZES, GGMLType

    _, type_size = BLOCK_SIZES[GGMLType[ggml_type]]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for start in SCALE_FIELDS[ggml_type]:
        blocks[:, start : start + 2] = (rng.standard_normal((n_blocks, 1)) * 0.05).astype("<f2").view(np.uint8)
    if ggml_type == "Q8_K":
        blocks[:, :4] = (rng.standard_normal((n_blocks, 1)) * 0.05).astype("<f4").view(np.uint8)
    return blocks


# Byte offsets of the f16 scale/min fields inside one block of each type (ggml-common.h layouts).
SCALE_FIELDS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_K": (),
}


def small_valid_file() -> tuple[list[bytes], list[Tensor]]:
    """Parts of a small file that exercises every metadata type and a few tensor types."""
    rng = np.random.default_rng(1)
    kvs = [
        kv_str("general.architecture", "llama"),
        kv_scalar("general.alignment", UINT32, 32),
        kv_scalar("t.u8", UINT8, 200), kv_scalar("t.i8", INT8, -5), kv_scalar("t.u16", UINT16, 60000),
        kv_scalar("t.i16", INT16, -30000), kv_scalar("t.u32", UINT32, 4_000_000_000),
        kv_scalar("t.i32", INT32, -2_000_000_000), kv_scalar("t.f32", FLOAT32, 1e-5),
        kv_scalar("t.bool", BOOL, True), kv_scalar("t.u64", UINT64, 2**63 + 5),
        kv_scalar("t.i64", INT64, -(2**62)), kv_scalar("t.f64", FLOAT64, 3.25),
        kv_str("t.str", "héllo ✓"),
        kv_array("t.tokens", STRING, ["<s>", "</s>", "▁the", ""]),
        kv_array("t.scores", FLOAT32, [0.0, -1.5, 2.25, 7.0]),
        kv_array("t.types", INT32, [1, 3, 1, 6]),
        kv_array("t.flags", BOOL, [True, False, True]),
        kv_array("t.nested", ARRAY, [array(UINT8, [1, 2]), array(UINT8, [3])]),
    ]
    tensors = [
        Tensor("f32", [3, 2], 0, rng.standard_normal(6).astype("<f4").tobytes()),
        Tensor("q4_0", [64, 2], 2, finite_blocks(rng, "Q4_0", 4).tobytes()),
        Tensor("f16", [5], 1, rng.standard_normal(5).astype("<f2").tobytes()),
        Tensor("q6_k", [256], 14, finite_blocks(rng, "Q6_K", 1).tobytes()),
    ]
    return kvs, tensors
