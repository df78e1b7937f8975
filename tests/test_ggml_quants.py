"""Dequantization is bit-exact with gguf-py's reference for every type corejax implements."""

from __future__ import annotations

import zlib

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf_factory import finite_blocks

from corejax.errors import UnsupportedModelError
from corejax.loading import ggml_quants
from corejax.loading.ggml_quants import BLOCK_SIZES, SUPPORTED_TYPES, UNPACKERS, GGMLType, dequantize

REFERENCE_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
ROW_BLOCKS = [(1, 1), (3, 2), (17, 5)]  # (rows, blocks per row)


def reference(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[type_name]
    return gguf.quants.dequantize(data.reshape(shape[0], -1), qtype).reshape(shape)


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Equal bit patterns (so NaNs, their payloads and signed zeros must agree too)."""
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), np.asarray(want, np.float32).view(np.uint32))


def test_enum_and_block_sizes_match_gguf_py():
    for t in gguf.GGMLQuantizationType:
        assert GGMLType[t.name] == t.value
        assert BLOCK_SIZES[GGMLType[t.name]] == gguf.GGML_QUANT_SIZES[t]


@pytest.mark.parametrize("type_name", REFERENCE_TYPES)
@pytest.mark.parametrize("rows,blocks_per_row", ROW_BLOCKS)
def test_bit_exact_finite_scales(type_name, rows, blocks_per_row):
    rng = np.random.default_rng(zlib.crc32(f"{type_name}{rows}".encode()))
    block, _ = BLOCK_SIZES[GGMLType[type_name]]
    data = finite_blocks(rng, type_name, rows * blocks_per_row).reshape(-1)
    shape = (rows, blocks_per_row * block)
    got = dequantize(data, GGMLType[type_name], shape)
    assert np.isfinite(got).all()
    assert_bits_equal(got, reference(data, type_name, shape))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("type_name", REFERENCE_TYPES + ["F16", "BF16", "F32"])
def test_bit_exact_fully_random_bytes(type_name):
    """Random scales include inf and NaN: those must propagate exactly as in the reference."""
    rng = np.random.default_rng(7)
    block, type_size = BLOCK_SIZES[GGMLType[type_name]]
    shape = (4, 64 * block if block == 1 else 3 * block)
    data = rng.integers(0, 256, size=shape[0] * shape[1] // block * type_size, dtype=np.uint8)
    got = dequantize(data, GGMLType[type_name], shape)
    want = reference(data, type_name, shape)
    assert np.array_equal(got, want, equal_nan=True)
    assert_bits_equal(got, want)


def test_bf16_and_f16_and_f32_shapes():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(x.view(np.uint8).reshape(-1), GGMLType.F32, x.shape), x)
    h = x.astype(np.float16)
    np.testing.assert_array_equal(dequantize(h.view(np.uint8).reshape(-1), GGMLType.F16, x.shape), h.astype(np.float32))
    bf = (x.view(np.uint32) >> 16).astype(np.uint16)
    want = (bf.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(dequantize(bf.view(np.uint8).reshape(-1), GGMLType.BF16, x.shape), want)


def test_q8_k_matches_ggml_formula():
    rng = np.random.default_rng(5)
    blocks = finite_blocks(rng, "Q8_K", 6)
    d = blocks[:, :4].copy().view("<f4").astype(np.float32)
    qs = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    got = dequantize(blocks.reshape(-1), GGMLType.Q8_K, (2, 768))
    assert_bits_equal(got, (d * qs).reshape(2, 768))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])  # gguf-py's quantizers
def test_quantize_roundtrip_through_gguf_py(type_name):
    """Realistic blocks, as a quantizer writes them, decode the same as in the reference."""
    qtype = gguf.GGMLQuantizationType[type_name]
    x = np.random.default_rng(11).standard_normal((8, 512)).astype(np.float32)
    q = gguf.quants.quantize(x, qtype)
    got = dequantize(q.reshape(-1), GGMLType[type_name], x.shape)
    assert_bits_equal(got, gguf.quants.dequantize(q, qtype))
    assert np.abs(got - x).max() < 0.5


@pytest.mark.parametrize("type_name", REFERENCE_TYPES + ["Q8_K"])
def test_unpackers_compose_to_dequantize(type_name):
    ggml_type = GGMLType[type_name]
    block, _ = BLOCK_SIZES[ggml_type]
    blocks = finite_blocks(np.random.default_rng(2), type_name, 9)
    q = UNPACKERS[ggml_type](blocks)
    n_sub = q.scales.shape[1]
    assert q.codes.shape == (9, block) and q.codes.dtype in (np.int8, np.uint8)
    assert q.scales.dtype == np.float32 and block % n_sub == 0
    assert q.mins is None or (q.mins.shape == q.scales.shape and q.mins.dtype == np.float32)
    codes = q.codes.reshape(9, n_sub, -1).astype(np.float32)
    manual = q.scales[..., None] * codes - (0 if q.mins is None else q.mins[..., None])
    assert_bits_equal(dequantize(blocks.reshape(-1), ggml_type, (9 * block,)), manual.reshape(-1))


@pytest.mark.parametrize(
    "type_name,lo,hi,n_sub",
    [("Q4_0", -8, 7, 1), ("Q4_1", 0, 15, 1), ("Q5_0", -16, 15, 1), ("Q5_1", 0, 31, 1), ("Q8_0", -128, 127, 1),
     ("Q2_K", 0, 3, 16), ("Q3_K", -4, 3, 16), ("Q4_K", 0, 15, 8), ("Q5_K", 0, 31, 8), ("Q6_K", -32, 31, 16)],
)
def test_unpacked_code_ranges(type_name, lo, hi, n_sub):
    """Codes span exactly the format's integer range: the quantized matmul sizes its lanes from this."""
    q = UNPACKERS[GGMLType[type_name]](finite_blocks(np.random.default_rng(4), type_name, 400))
    assert q.codes.min() == lo and q.codes.max() == hi
    assert q.scales.shape == (400, n_sub)


def test_chunked_dequantize_matches_one_shot(monkeypatch):
    blocks = finite_blocks(np.random.default_rng(8), "Q4_K", 10).reshape(-1)
    whole = dequantize(blocks, GGMLType.Q4_K, (5, 512))
    monkeypatch.setattr(ggml_quants, "_CHUNK_BLOCKS", 3)
    assert_bits_equal(dequantize(blocks, GGMLType.Q4_K, (5, 512)), whole)


@pytest.mark.parametrize("ggml_type", sorted(set(GGMLType) - SUPPORTED_TYPES))
def test_unimplemented_types_raise_unsupported(ggml_type):
    block, type_size = BLOCK_SIZES[ggml_type]
    with pytest.raises(UnsupportedModelError, match=ggml_type.name):
        dequantize(np.zeros(type_size, np.uint8), ggml_type, (block,))


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="whole blocks"):
        dequantize(np.zeros(18, np.uint8), GGMLType.Q4_0, (16,))
    with pytest.raises(ValueError, match="needs 18"):
        dequantize(np.zeros(19, np.uint8), GGMLType.Q4_0, (32,))
