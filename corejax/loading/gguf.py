"""A bounds-checked, mmap-backed reader for GGUF v2/v3 files (llama.cpp's model format)."""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import pathlib
import struct
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from corejax.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from corejax.loading.ggml_quants import BLOCK_SIZES, SUPPORTED_TYPES, GGMLType, dequantize

__all__ = ["GGMLType", "GGUFFile", "TensorInfo", "read_gguf"]

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 3  # real files nest at most once; deeper is an attack on the recursion limit
_MAX_ELEMENTS = 1 << 62  # ggml counts elements in int64

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# GGUF metadata value types -> (struct format, numpy dtype) for the fixed-size ones.
_SCALARS: dict[int, tuple[struct.Struct, str]] = {
    0: (struct.Struct("<B"), "<u1"),
    1: (struct.Struct("<b"), "<i1"),
    2: (struct.Struct("<H"), "<u2"),
    3: (struct.Struct("<h"), "<i2"),
    4: (struct.Struct("<I"), "<u4"),
    5: (struct.Struct("<i"), "<i4"),
    6: (struct.Struct("<f"), "<f4"),
    7: (struct.Struct("<B"), "<u1"),
    10: (struct.Struct("<Q"), "<u8"),
    11: (struct.Struct("<q"), "<i8"),
    12: (struct.Struct("<d"), "<f8"),
}
_BOOL, _STRING, _ARRAY = 7, 8, 9
# The fewest bytes one value of each type can take, to reject counts that cannot fit before looping.
_MIN_SIZE = {t: s.size for t, (s, _) in _SCALARS.items()} | {_STRING: 8, _ARRAY: 12}
_MIN_KV = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (reversed GGUF dims): last axis contiguous
    ggml_type: GGMLType
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Reads little-endian GGUF fields from the mmap, checking every length against the file first."""

    def __init__(self, buf: mmap.mmap, u8: np.ndarray, path: pathlib.Path):
        self.buf, self.u8, self.path = buf, u8, path
        self.size = len(buf)
        self.pos = 0

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {what}; the file is truncated or corrupt")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ({self.size} bytes) ends first")

    def unpack(self, fmt: struct.Struct, what: str) -> Any:
        self.need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def u32(self, what: str) -> int:
        return self.unpack(_U32, what)

    def u64(self, what: str) -> int:
        return self.unpack(_U64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} claims {n} bytes, past the end of the file ({self.size} bytes)")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} ({raw[:40]!r}) is not valid UTF-8") from None

    def count(self, n: int, min_item: int, what: str) -> None:
        if n * min_item > self.size - self.pos:
            raise self.fail(
                f"{what} is {n}, which cannot fit in the {self.size - self.pos} bytes left at byte {self.pos}"
            )

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string(f"the value of {_name(key)}")
        if vtype == _ARRAY:
            return self.array(key, depth + 1)
        if vtype not in _SCALARS:
            raise self.fail(f"metadata key {_name(key)} has unknown value type {vtype}")
        value = self.unpack(_SCALARS[vtype][0], f"the value of {_name(key)}")
        return bool(value) if vtype == _BOOL else value

    def array(self, key: str, depth: int) -> Any:
        if depth > _MAX_ARRAY_DEPTH:
            raise self.fail(f"metadata key {_name(key)} nests arrays deeper than {_MAX_ARRAY_DEPTH} levels")
        itype = self.u32(f"the element type of {_name(key)}")
        n = self.u64(f"the length of {_name(key)}")
        if itype not in _MIN_SIZE:
            raise self.fail(f"metadata key {_name(key)} is an array of unknown value type {itype}")
        self.count(n, _MIN_SIZE[itype], f"the length of array {_name(key)}")
        if itype == _STRING:
            return self.string_array(n, key)
        if itype == _ARRAY:
            return [self.array(key, depth + 1) for _ in range(n)]
        dtype = np.dtype(_SCALARS[itype][1])
        # A zero-copy view of the mmap: a 262144-entry score table costs nothing to open.
        view = self.u8[self.pos : self.pos + n * dtype.itemsize].view(dtype)
        self.pos += n * dtype.itemsize
        return view != 0 if itype == _BOOL else view

    def string_array(self, n: int, key: str) -> list[str]:
        # Vocabularies hold ~262k strings, so this loop stays free of method calls.
        buf, size, pos, unpack = self.buf, self.size, self.pos, _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(n):
                if pos + 8 > size:
                    raise self.fail(f"string {len(out)} of {_name(key)} runs past the end of the file ({size} bytes)")
                (length,) = unpack(buf, pos)
                pos += 8
                if length > size - pos:
                    raise self.fail(
                        f"string {len(out)} of {_name(key)} claims {length} bytes, past the end of the file ({size} bytes)"
                    )
                append(buf[pos : pos + length].decode("utf-8"))
                pos += length
        except UnicodeDecodeError:
            raise self.fail(f"string {len(out)} of metadata key {_name(key)} is not valid UTF-8") from None
        self.pos = pos
        return out


class GGUFFile:
    """An open GGUF file: metadata, tensor directory and zero-copy access to tensor bytes.

    Use as a context manager; arrays handed out (metadata arrays, raw()) keep the mapping alive
    until they are garbage-collected, even after close().
    """

    def __init__(self, path: pathlib.Path, mm: mmap.mmap, header: tuple | None = None):
        self.path = path
        self._mmap: mmap.mmap | None = mm
        self._fd: int | None = None  # opened by read()
        self._u8: np.ndarray | None = np.frombuffer(mm, dtype=np.uint8)
        if header is not None:  # parsed before from the same file (reuse_headers)
            version, metadata, types, self.alignment, tensors = header
            self.version, self.metadata, self.metadata_types, self.tensors = version, dict(metadata), types, tensors
            return
        cur = _Cursor(mm, self._u8, path)
        self.version, n_tensors, n_kv = _read_header(cur)
        # metadata_types: key -> (GGUF value type, element type for arrays else None), so a writer can copy them.
        self.metadata, self.metadata_types = _read_metadata(cur, n_kv)
        self.alignment = _alignment(cur, self.metadata)
        self.tensors: dict[str, TensorInfo] = _read_tensor_infos(cur, n_tensors, self.alignment)

    def header(self) -> tuple:
        """What parsing found, with metadata arrays copied off the mapping (reuse_headers keeps it)."""
        metadata = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in self.metadata.items()}
        return self.version, metadata, self.metadata_types, self.alignment, self.tensors

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(
                f"{self.path}: metadata key 'general.architecture' is missing or not a string; "
                "the file was not written by a GGUF model converter"
            )
        return arch

    def _info(self, name: str) -> TensorInfo:
        if self._u8 is None:
            raise ValueError(f"{self.path}: the GGUF file is closed")
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a read-only uint8 view of the mmap."""
        info = self._info(name)
        return self._u8[info.offset : info.offset + info.nbytes]

    def read(self, name: str, scratch: list[np.ndarray]) -> np.ndarray:
        """The tensor's bytes read (pread) into a buffer reused from one call to the next (`scratch` holds it;
        the result is valid until the next call): the loader's path for tensors it converts at once. Reading
        copies from the page cache at memory speed, where touching the mapping page by page faulted once per
        64 KiB (an 8B file: seconds) and left the pages counted in the process's RSS."""
        info = self._info(name)
        if not scratch or scratch[0].nbytes < info.nbytes:
            from corejax.hostmem import aligned_empty

            scratch[:] = [aligned_empty((max(info.nbytes, 1 << 20),), np.uint8)]
        out = scratch[0][:info.nbytes]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        done = 0
        while done < info.nbytes:
            n = os.preadv(self._fd, [memoryview(out[done:])], info.offset + done)
            if n <= 0:
                raise ModelFormatError(f"{self.path}: the file ended inside tensor {name!r}; it was truncated")
            done += n
        return out

    def release(self, name: str) -> None:
        """Drops the tensor's pages from this process's resident memory (madvise MADV_DONTNEED on the read-only
        mapping; the page cache keeps them, and a later read faults them back in, unchanged): the loader calls
        it once a tensor is converted, so loading holds the converted weights plus one tensor of the file, not
        the whole file on top (RSS counts a mapping's touched pages until it is unmapped)."""
        info = self._info(name)
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = -(-info.offset // page) * page  # whole pages of this tensor only: a neighbour's may be in use
        hi = (info.offset + info.nbytes) // page * page
        if hi > lo:
            self._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 of TensorInfo.shape (F32 tensors come back as read-only views)."""
        info = self._info(name)
        if info.ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name!r} has ggml type {info.ggml_type.name}, which corejax cannot "
                f"dequantize; use a file quantized to one of "
                f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES))}"
            )
        return dequantize(self.raw(name), info.ggml_type, info.shape)

    def close(self) -> None:
        self._u8 = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # arrays handed out still view it; the mapping goes when the last one is freed
            self._mmap = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, version={self.version}, tensors={len(self.tensors)})"


def _read_header(cur: _Cursor) -> tuple[int, int, int]:
    if cur.size < 4 or cur.buf[:4] != _MAGIC:
        raise ModelFormatError(
            f"{cur.path}: not a GGUF file (it does not start with the magic bytes 'GGUF'); "
            "pass a .gguf model file"
        )
    cur.pos = 4
    version = cur.u32("the version")
    if version not in _VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in _VERSIONS:
            hint = "it looks big-endian, which corejax does not read; use a little-endian conversion"
        elif version < min(_VERSIONS):
            hint = "re-convert the model with a current llama.cpp"
        else:
            hint = "it is newer than this corejax; upgrade corejax or convert to GGUF v3"
        raise ModelFormatError(f"{cur.path}: unsupported GGUF version {version} (corejax reads 2 and 3); {hint}")
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the metadata key count")
    cur.count(n_kv, _MIN_KV, "the metadata key count")
    cur.count(n_tensors, _MIN_TENSOR_INFO, "the tensor count")
    if n_kv * _MIN_KV + n_tensors * _MIN_TENSOR_INFO > cur.size - cur.pos:
        raise cur.fail(f"{n_kv} metadata keys and {n_tensors} tensors cannot fit in a {cur.size}-byte file")
    return version, n_tensors, n_kv


def _name(key: str) -> str:
    """A metadata key as an error message shows it: a hostile file's "key" may be megabytes of its bytes."""
    return repr(key) if len(key) <= 120 else f"{key[:120]!r}... ({len(key):,} characters)"


def _read_metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, tuple[int, int | None]]]:
    metadata: dict[str, Any] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        if key in metadata:
            raise cur.fail(f"metadata key {_name(key)} appears twice")
        vtype = cur.u32(f"the value type of {_name(key)}")
        sub = _U32.unpack_from(cur.buf, cur.pos)[0] if vtype == _ARRAY and cur.size - cur.pos >= 4 else None
        metadata[key] = cur.value(vtype, key)
        types[key] = (vtype, sub)
    return metadata, types


def _alignment(cur: _Cursor, metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int):
        raise cur.fail(f"metadata key 'general.alignment' must be an integer, got {type(alignment).__name__}")
    if alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment} is not a power of two")
    return alignment


def _read_tensor_infos(cur: _Cursor, n_tensors: int, alignment: int) -> dict[str, TensorInfo]:
    # (name, numpy shape, type, offset relative to the data section); offsets resolve once
    # the directory's end, and so the data section's start, is known.
    entries: list[tuple[str, tuple[int, ...], GGMLType, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor {i}")
        if name in names:
            raise cur.fail(f"tensor name {name!r} appears twice")
        names.add(name)
        n_dims = cur.u32(f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {_MAX_DIMS}")
        dims = [cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        type_id = cur.u32(f"the type of tensor {name!r}")
        rel_offset = cur.u64(f"the data offset of tensor {name!r}")
        entries.append((name, _shape(cur, name, dims), _ggml_type(cur, name, type_id), rel_offset))
    data_start = -(-cur.pos // alignment) * alignment
    infos = [_resolve(cur, e, data_start, alignment) for e in entries]
    _check_overlap(cur, infos)
    return {info.name: info for info in infos}


def _shape(cur: _Cursor, name: str, dims: list[int]) -> tuple[int, ...]:
    n = 1
    for d in dims:
        if d == 0 or d >= 1 << 63:
            raise cur.fail(f"tensor {name!r} has dimension {d} in {dims}; dimensions must be between 1 and 2**63-1")
        n *= d
    if n > _MAX_ELEMENTS:
        raise cur.fail(f"tensor {name!r} with dimensions {dims} has more elements than ggml can address")
    return tuple(reversed(dims))


def _ggml_type(cur: _Cursor, name: str, type_id: int) -> GGMLType:
    try:
        return GGMLType(type_id)
    except ValueError:
        raise cur.fail(f"tensor {name!r} has unknown ggml type id {type_id}") from None


def _resolve(cur: _Cursor, entry: tuple, data_start: int, alignment: int) -> TensorInfo:
    name, shape, ggml_type, rel_offset = entry
    block, type_size = BLOCK_SIZES[ggml_type]
    if shape[-1] % block:
        raise cur.fail(
            f"tensor {name!r} has rows of {shape[-1]} elements, not a multiple of the {ggml_type.name} "
            f"block size {block}"
        )
    n = 1
    for d in shape:
        n *= d
    nbytes = n // block * type_size
    if rel_offset % alignment:
        raise cur.fail(f"tensor {name!r} data offset {rel_offset} is not aligned to {alignment} bytes")
    offset = data_start + rel_offset
    if offset > cur.size or nbytes > cur.size - offset:
        raise ModelFormatError(
            f"{cur.path}: tensor {name!r} data (offset {offset}, {nbytes} bytes) runs past the end of the file "
            f"({cur.size} bytes); the file is truncated or corrupt"
        )
    return TensorInfo(name, shape, ggml_type, offset, nbytes)


def _check_overlap(cur: _Cursor, infos: list[TensorInfo]) -> None:
    ordered = sorted(infos, key=lambda t: (t.offset, t.nbytes))
    for prev, nxt in zip(ordered, ordered[1:]):
        if nxt.offset < prev.offset + prev.nbytes:
            raise cur.fail(
                f"tensor {nxt.name!r} data (offset {nxt.offset}) overlaps tensor {prev.name!r} "
                f"(offset {prev.offset}, {prev.nbytes} bytes)"
            )


_headers = threading.local()


@contextlib.contextmanager
def reuse_headers() -> Iterator[None]:
    """Within the block, a file opened again (same path, inode, size and modification time) is not parsed again:
    loading a model opens it four times (weights mode, memory plan, load, description), and each parse reads
    the whole vocabulary (Gemma 3: 262,144 strings). The parsed headers are dropped when the block ends."""
    outer = getattr(_headers, "cache", None)
    if outer is None:
        _headers.cache = {}
    try:
        yield
    finally:
        if outer is None:
            _headers.cache = None


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file; raises ModelFormatError if any field disagrees with the file."""
    path = pathlib.Path(path)
    cache = getattr(_headers, "cache", None)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            key = (os.path.realpath(path), st.st_dev, st.st_ino, size, st.st_mtime_ns)
            if size < 4 + 4 + 8 + 8:
                raise ModelFormatError(
                    f"{path}: {size} bytes is too small to be a GGUF file (the header alone is 24 bytes); "
                    "the file is truncated or not a model"
                )
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: no such file; check the model path") from None
    except IsADirectoryError:
        raise ModelFormatError(f"{path}: is a directory, not a GGUF file; pass the .gguf file inside it") from None
    try:
        if cache is not None and key in cache:
            return GGUFFile(path, mm, cache[key])
        opened = GGUFFile(path, mm)
        if cache is not None:
            cache[key] = opened.header()
        return opened
    except BaseException:
        try:
            mm.close()
        except BufferError:
            pass  # views made before the error live in its traceback; the mapping goes with them
        raise
