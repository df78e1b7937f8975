"""The GGUF reader agrees with gguf-py on valid files and rejects broken or hostile ones with ModelFormatError."""

from __future__ import annotations

import itertools
import pathlib
import tempfile

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf_factory import (
    ARRAY, BOOL, FLOAT32, FLOAT64, STRING, UINT8, UINT32, Tensor, array, build, finite_blocks, gstr, kv, kv_array,
    kv_scalar, kv_str, small_valid_file, u32, u64,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corejax.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from corejax.loading.ggml_quants import SUPPORTED_TYPES
from corejax.loading.gguf import GGMLType, GGUFFile, TensorInfo, read_gguf


def write(tmp_path: pathlib.Path, data: bytes, name: str = "m.gguf") -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def expect_format_error(tmp_path: pathlib.Path, data: bytes, phrase: str) -> ModelFormatError:
    path = write(tmp_path, data)
    with pytest.raises(ModelFormatError, match=phrase) as err:
        read_gguf(path).close()
    assert str(path) in str(err.value)
    return err.value


def ref_metadata(reader: gguf.GGUFReader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def assert_metadata_matches_reference(f: GGUFFile, reader: gguf.GGUFReader) -> None:
    want = ref_metadata(reader)
    assert list(f.metadata) == list(want)
    for key, value in f.metadata.items():
        if isinstance(value, np.ndarray):
            assert value.ndim == 1 and np.array_equal(value, np.asarray(want[key], dtype=value.dtype)), key
        else:
            assert value == want[key] and type(value) is type(want[key]), key


def assert_tensors_match_reference(f: GGUFFile, reader: gguf.GGUFReader, dequantize_names=None) -> None:
    assert list(f.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = f.tensors[t.name]
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert info.ggml_type == t.tensor_type and info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert np.array_equal(f.raw(t.name), t.data.reshape(-1).view(np.uint8))
        if dequantize_names is None or t.name in dequantize_names:
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(info.shape)
            got = f.dequantize(t.name)
            assert got.dtype == np.float32 and got.shape == info.shape
            assert np.array_equal(got, want, equal_nan=True), t.name


# ----------------------------------------------------------------------------------------------- valid files


def test_small_file_metadata_and_tensors(tmp_path):
    kvs, tensors = small_valid_file()
    path = write(tmp_path, build(kvs, tensors))
    with read_gguf(path) as f:
        assert f.version == 3 and f.alignment == 32 and f.architecture == "llama" and f.path == path
        m = f.metadata
        assert m["t.u8"] == 200 and m["t.i8"] == -5 and m["t.u64"] == 2**63 + 5 and m["t.i64"] == -(2**62)
        assert m["t.f32"] == np.float32(1e-5) and m["t.f64"] == 3.25 and m["t.bool"] is True
        assert m["t.str"] == "héllo ✓" and m["t.tokens"] == ["<s>", "</s>", "▁the", ""]
        assert m["t.scores"].dtype == np.float32 and m["t.scores"].tolist() == [0.0, -1.5, 2.25, 7.0]
        assert m["t.types"].dtype == np.int32 and m["t.flags"].tolist() == [True, False, True]
        assert [a.tolist() for a in m["t.nested"]] == [[1, 2], [3]]
        assert not m["t.scores"].flags.writeable  # a view of the read-only mapping, not a copy
        assert f.tensors["q4_0"] == TensorInfo("q4_0", (2, 64), GGMLType.Q4_0, f.tensors["q4_0"].offset, 72)
        assert [t.shape for t in f.tensors.values()] == [(2, 3), (2, 64), (5,), (256,)]
        assert all(t.offset % 32 == 0 for t in f.tensors.values())
        assert np.array_equal(f.dequantize("f32"), np.frombuffer(tensors[0].data, "<f4").reshape(2, 3))
        reader = gguf.GGUFReader(path)
        assert_tensors_match_reference(f, reader)
        want = ref_metadata(reader)
        for key in m:
            if key != "t.nested":  # gguf-py flattens arrays of arrays
                assert np.array_equal(np.asarray(m[key]), np.asarray(want[key])), key


def test_file_written_by_gguf_py_writer(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_uint32("gemma3.block_count", 18)
    w.add_float32("gemma3.rope.freq_base", 1e6)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_array("tokenizer.ggml.tokens", ["<pad>", "<eos>", "a", "▁b"])
    w.add_array("tokenizer.ggml.scores", [0.0, 0.5, -1.0, -2.0])
    w.add_array("tokenizer.ggml.token_type", [3, 3, 1, 1])
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    w.add_tensor("norm", rng.standard_normal(640).astype(np.float32))
    w.add_tensor("half", rng.standard_normal((4, 6)).astype(np.float16))
    for i, name in enumerate(["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]):
        blocks = finite_blocks(rng, name, 6).reshape(3, -1)  # 3 rows of 2 blocks
        w.add_tensor(f"blk.{i}.{name}", blocks, raw_dtype=gguf.GGMLQuantizationType[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with read_gguf(path) as f:
        reader = gguf.GGUFReader(path)
        assert f.architecture == "gemma3"
        assert_metadata_matches_reference(f, reader)
        assert_tensors_match_reference(f, reader)


def test_custom_alignment_and_version_2(tmp_path):
    kvs, tensors = small_valid_file()
    kvs[1] = kv_scalar("general.alignment", UINT32, 64)
    with read_gguf(write(tmp_path, build(kvs, tensors, alignment=64, version=2))) as f:
        assert f.version == 2 and f.alignment == 64
        assert all(t.offset % 64 == 0 for t in f.tensors.values())
        assert np.array_equal(f.dequantize("f32"), np.frombuffer(tensors[0].data, "<f4").reshape(2, 3))


def test_views_outlive_close_and_closed_file_refuses_access(tmp_path):
    kvs, tensors = small_valid_file()
    f = read_gguf(write(tmp_path, build(kvs, tensors)))
    scores, raw = f.metadata["t.scores"], f.raw("q6_k")
    f.close()
    f.close()
    assert scores.tolist() == [0.0, -1.5, 2.25, 7.0] and raw.nbytes == 210
    with pytest.raises(ValueError, match="closed"):
        f.raw("q6_k")


def test_unknown_tensor_name_is_a_key_error(tmp_path):
    with read_gguf(write(tmp_path, build(*small_valid_file()))) as f, pytest.raises(KeyError, match="nope"):
        f.raw("nope")


def test_unimplemented_tensor_type_is_unsupported_not_corrupt(tmp_path):
    kvs, tensors = small_valid_file()
    tensors.append(Tensor("blk.0.ffn_up.weight", [256], int(GGMLType.IQ2_XXS), bytes(66)))
    with read_gguf(write(tmp_path, build(kvs, tensors))) as f:
        assert f.tensors["blk.0.ffn_up.weight"].ggml_type == GGMLType.IQ2_XXS
        with pytest.raises(UnsupportedModelError, match=r"'blk\.0\.ffn_up\.weight' has ggml type IQ2_XXS"):
            f.dequantize("blk.0.ffn_up.weight")


def test_missing_architecture(tmp_path):
    kvs, tensors = small_valid_file()
    with read_gguf(write(tmp_path, build(kvs[1:], tensors))) as f, pytest.raises(ModelFormatError, match="general.architecture"):
        f.architecture


# ---------------------------------------------------------------------------------- broken and hostile files


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        read_gguf(tmp_path / "absent.gguf")
    with pytest.raises(ModelFormatError, match="is a directory"):
        read_gguf(tmp_path)


@pytest.mark.parametrize("size", [0, 3, 23])
def test_too_small(tmp_path, size):
    expect_format_error(tmp_path, build(*small_valid_file())[:size], "too small to be a GGUF file")


def test_bad_magic(tmp_path):
    expect_format_error(tmp_path, build(*small_valid_file(), magic=b"GGJT"), "magic bytes 'GGUF'")


@pytest.mark.parametrize("version,phrase", [(1, "unsupported GGUF version 1"), (4, "version 4"), (3 << 24, "big-endian")])
def test_unsupported_version(tmp_path, version, phrase):
    expect_format_error(tmp_path, build(*small_valid_file(), version=version), phrase)


@pytest.mark.parametrize("field", ["n_kv", "n_tensors"])
def test_counts_that_cannot_fit(tmp_path, field):
    phrase = {"n_kv": "metadata key count is 18446744073709551615", "n_tensors": "tensor count is 18446744073709551615"}
    expect_format_error(tmp_path, build(*small_valid_file(), **{field: 2**64 - 1}), phrase[field])


def test_counts_slightly_too_big(tmp_path):
    kvs, tensors = small_valid_file()
    expect_format_error(tmp_path, build(kvs, tensors, n_kv=len(kvs) + 1), "corrupt")
    expect_format_error(tmp_path, build(kvs, tensors, n_tensors=len(tensors) + 1), "corrupt")


def test_key_length_past_eof(tmp_path):
    expect_format_error(tmp_path, build([u64(10**12) + b"general.architecture"], []), "claims 1000000000000 bytes, past the end")


def test_value_string_length_past_eof(tmp_path):
    data = build([kv("general.name", STRING, u64(2**63) + b"x" * 32)], [])
    expect_format_error(tmp_path, data, "the value of 'general.name' at byte .* claims 9223372036854775808 bytes")


def test_invalid_utf8_in_key(tmp_path):
    kvs, tensors = small_valid_file()
    kvs.insert(2, kv_scalar(b"t.bad\xff", UINT32, 1))
    expect_format_error(tmp_path, build(kvs, tensors), r"metadata key 2 \(b't.bad\\xff'\) is not valid UTF-8")


def test_invalid_utf8_in_value(tmp_path):
    kvs, tensors = small_valid_file()
    kvs.append(kv_str("general.name", b"\xc3\x28"))
    expect_format_error(tmp_path, build(kvs, tensors), "the value of 'general.name'.* is not valid UTF-8")


def test_invalid_utf8_in_string_array(tmp_path):
    kvs, tensors = small_valid_file()
    kvs.append(kv_array("tokenizer.ggml.tokens", STRING, [b"ok", b"\xed\xa0\x80"]))  # a UTF-16 surrogate
    expect_format_error(tmp_path, build(kvs, tensors), "string 1 of metadata key 'tokenizer.ggml.tokens' is not valid UTF-8")


def test_invalid_utf8_in_tensor_name(tmp_path):
    kvs, tensors = small_valid_file()
    tensors[1].name = b"blk.\x80"
    expect_format_error(tmp_path, build(kvs, tensors), "the name of tensor 1 .* is not valid UTF-8")


def test_unknown_value_type(tmp_path):
    kvs, tensors = small_valid_file()
    kvs.append(kv("t.weird", 13, bytes(8)))
    expect_format_error(tmp_path, build(kvs, tensors), "'t.weird' has unknown value type 13")
    kvs[-1] = kv("t.weird", ARRAY, u32(99) + u64(1) + bytes(8))
    expect_format_error(tmp_path, build(kvs, tensors), "'t.weird' is an array of unknown value type 99")


@pytest.mark.parametrize("depth", [4, 100_000])
def test_array_nesting_too_deep(tmp_path, depth):
    value = (u32(ARRAY) + u64(1)) * (depth - 1) + array(UINT8, [1])
    kvs, tensors = small_valid_file()
    kvs.append(kv("t.deep", ARRAY, value))
    expect_format_error(tmp_path, build(kvs, tensors), "'t.deep' nests arrays deeper than 3 levels")


@pytest.mark.parametrize("itype", [UINT8, FLOAT64, STRING, ARRAY])
def test_array_count_past_eof(tmp_path, itype):
    kvs, tensors = small_valid_file()
    kvs.append(kv("t.big", ARRAY, u32(itype) + u64(2**62) + bytes(16)))
    expect_format_error(tmp_path, build(kvs, tensors), "the length of array 't.big' is 4611686018427387904, which cannot fit")


def test_string_array_runs_past_eof(tmp_path):
    # The count passes the cheap 8-bytes-per-string check, but the strings themselves are longer.
    header = b"GGUF" + u32(3) + u64(0) + u64(1)  # no tensors, so no padding after the metadata
    data = header + kv("t.toks", ARRAY, u32(STRING) + u64(3) + gstr("a") + gstr("b") + bytes(6))
    expect_format_error(tmp_path, data, "string 2 of 't.toks' runs past the end of the file")
    data = header + kv("t.toks", ARRAY, u32(STRING) + u64(2) + gstr("a") + u64(1000) + b"bb")
    expect_format_error(tmp_path, data, "string 1 of 't.toks' claims 1000 bytes")


@pytest.mark.parametrize("dims,phrase", [([1] * 5, "has 5 dimensions; GGUF allows 1 to 4"), ([], "has 0 dimensions")])
def test_bad_dimension_count(tmp_path, dims, phrase):
    kvs, tensors = small_valid_file()
    tensors.append(Tensor("t.x", dims, 0, bytes(4)))
    expect_format_error(tmp_path, build(kvs, tensors), phrase)


@pytest.mark.parametrize(
    "dims,phrase",
    [([0, 4], r"has dimension 0 in \[0, 4\]"),
     ([2**63, 1], "has dimension 9223372036854775808"),
     ([2**64 - 1], "has dimension 18446744073709551615"),
     ([2**40, 2**40], "more elements than ggml can address"),
     ([2**31, 2**31], "runs past the end of the file")],
)
def test_bad_dimensions(tmp_path, dims, phrase):
    kvs, tensors = small_valid_file()
    tensors.append(Tensor("t.x", dims, 0, bytes(4)))
    expect_format_error(tmp_path, build(kvs, tensors), phrase)


def test_rows_not_a_multiple_of_the_block_size(tmp_path):
    kvs, tensors = small_valid_file()
    tensors.append(Tensor("t.q", [48, 2], int(GGMLType.Q4_0), bytes(54)))
    expect_format_error(tmp_path, build(kvs, tensors), "rows of 48 elements, not a multiple of the Q4_0 block size 32")


@pytest.mark.parametrize("type_id", [4, 5, 99, 2**32 - 1])
def test_unknown_ggml_type(tmp_path, type_id):
    kvs, tensors = small_valid_file()
    tensors.append(Tensor("t.x", [32], type_id, bytes(32)))
    expect_format_error(tmp_path, build(kvs, tensors), f"'t.x' has unknown ggml type id {type_id}")


def test_offset_not_aligned(tmp_path):
    kvs, tensors = small_valid_file()
    tensors[1].offset = 40
    expect_format_error(tmp_path, build(kvs, tensors), "'q4_0' data offset 40 is not aligned to 32 bytes")


def test_overlapping_tensors(tmp_path):
    kvs, tensors = small_valid_file()
    tensors[2].offset = 64  # inside q4_0, which starts at 32 and takes 72 bytes
    expect_format_error(tmp_path, build(kvs, tensors), "'f16' data .* overlaps tensor 'q4_0'")


def test_offset_past_eof(tmp_path):
    kvs, tensors = small_valid_file()
    tensors[0].offset = 2**64 - 32
    err = expect_format_error(tmp_path, build(kvs, tensors), r"tensor 'f32' data \(offset \d+, 24 bytes\) runs past the end")
    assert "truncated or corrupt" in str(err)


def test_truncated_tensor_data(tmp_path):
    data = build(*small_valid_file())
    expect_format_error(tmp_path, data[:-1], r"tensor 'q6_k' data \(offset \d+, 210 bytes\) runs past the end of the file \(1169 bytes\)")


@pytest.mark.parametrize(
    "payload,phrase",
    [(kv_scalar("general.alignment", UINT32, 48), "general.alignment 48 is not a power of two"),
     (kv_scalar("general.alignment", UINT32, 0), "general.alignment 0 is not a power of two"),
     (kv_str("general.alignment", "32"), "'general.alignment' must be an integer, got str"),
     (kv_scalar("general.alignment", BOOL, True), "must be an integer, got bool"),
     (kv_scalar("general.alignment", FLOAT32, 32.0), "must be an integer, got float")],
)
def test_bad_alignment(tmp_path, payload, phrase):
    kvs, tensors = small_valid_file()
    kvs[1] = payload
    expect_format_error(tmp_path, build(kvs, tensors), phrase)


def test_duplicate_key(tmp_path):
    kvs, tensors = small_valid_file()
    kvs.append(kv_scalar("t.u8", UINT8, 1))
    expect_format_error(tmp_path, build(kvs, tensors), "metadata key 't.u8' appears twice")


def test_duplicate_tensor_name(tmp_path):
    kvs, tensors = small_valid_file()
    tensors[3].name = "f32"
    expect_format_error(tmp_path, build(kvs, tensors), "tensor name 'f32' appears twice")


def test_every_truncation_is_a_format_error(tmp_path):
    data = build(*small_valid_file())
    for n in range(len(data)):
        path = write(tmp_path, data[:n], f"t{n}.gguf")
        with pytest.raises(ModelFormatError):
            read_gguf(path)


_FUZZ_BASE = build(*small_valid_file())
_FUZZ_DIR = tempfile.mkdtemp(prefix="corejax-gguf-fuzz-")
_fuzz_ids = itertools.count()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(st.tuples(st.integers(0, len(_FUZZ_BASE) - 1), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, len(_FUZZ_BASE)),
)
def test_fuzz_only_corejax_errors(flips, cut):
    data = bytearray(_FUZZ_BASE)
    for pos, byte in flips:
        data[pos] = byte
    if cut is not None:
        del data[cut:]
    # Each example gets its own file: a failed open may leave the previous mapping alive until GC.
    path = pathlib.Path(_FUZZ_DIR) / f"{next(_fuzz_ids)}.gguf"
    path.write_bytes(bytes(data))
    try:
        with read_gguf(path) as f:
            _ = f.metadata, f.alignment, f.version
            for name in f.tensors:
                try:
                    out = f.dequantize(name)
                    assert out.dtype == np.float32 and out.shape == f.tensors[name].shape
                except UnsupportedModelError:
                    pass
            f.architecture
    except (ModelFormatError, UnsupportedModelError):
        pass
    finally:
        path.unlink()


# ------------------------------------------------------------------------------------------ real model files


@pytest.fixture(scope="module")
def smollm2_path(smollm2_gguf) -> pathlib.Path:
    return smollm2_gguf


@pytest.fixture(scope="module")
def gemma3_path(gemma3_gguf) -> pathlib.Path:
    return gemma3_gguf


def _sample_per_type(reader: gguf.GGUFReader) -> set[str]:
    """The first and last tensor of every type present, plus the largest tensor overall."""
    by_type: dict[int, list[str]] = {}
    for t in reader.tensors:
        by_type.setdefault(int(t.tensor_type), []).append(t.name)
    names = {n for group in by_type.values() for n in (group[0], group[-1])}
    names.add(max(reader.tensors, key=lambda t: t.n_bytes).name)
    return names


@pytest.mark.slow
@pytest.mark.parametrize("fixture,arch", [("smollm2_path", "llama"), ("gemma3_path", "gemma3")])
def test_real_file_matches_gguf_py(request, fixture, arch):
    path = request.getfixturevalue(fixture)
    reader = gguf.GGUFReader(path)
    with read_gguf(path) as f:
        assert f.architecture == arch and f.version == reader.fields["GGUF.version"].contents()
        assert f.alignment == reader.alignment
        assert {t.ggml_type for t in f.tensors.values()} <= SUPPORTED_TYPES
        assert_metadata_matches_reference(f, reader)
        # Vocab-sized numeric arrays are views of the mapping: opening a 262144-token vocab copies nothing.
        arrays = [v for v in f.metadata.values() if isinstance(v, np.ndarray) and v.dtype != np.bool_]
        assert arrays and not any(a.flags.owndata for a in arrays)
        assert_tensors_match_reference(f, reader, dequantize_names=_sample_per_type(reader))


def test_reuse_headers_parses_a_file_once(tmp_path, monkeypatch):
    """Loading opens a file four times; within reuse_headers the header is parsed once, a rewritten file again,
    and outside the block every open parses."""
    import os

    from corejax.loading import gguf as ours
    from tiny_model import write_tiny_llama

    path = write_tiny_llama(tmp_path / "t.gguf")
    parses = []
    original = ours._read_metadata
    monkeypatch.setattr(ours, "_read_metadata", lambda *a: parses.append(1) or original(*a))
    with ours.reuse_headers():
        with ours.read_gguf(path) as f:
            first = (dict(f.metadata), f.tensors)
        for _ in range(3):
            with ours.read_gguf(path) as f:
                assert f.tensors == first[1] and f.metadata.keys() == first[0].keys()
                assert f.raw(next(iter(f.tensors))).size > 0  # tensor bytes come from the new mapping
        assert len(parses) == 1
        os.utime(path, ns=(1, 1))  # the same path, another modification time: parsed again
        ours.read_gguf(path).close()
        assert len(parses) == 2
    ours.read_gguf(path).close()
    assert len(parses) == 3
