"""The repacked-weights cache: a quantized GGUF's params in the kernels' layout, written once to a file under the
corejax cache and mapped read-only on later loads, so a second load costs a mapping instead of a repack.

Why: repacking every block (kernels/ggml_repack.cc) into lazily committed memory took an 8B Q4_0 file 4-5 s
in-process and left the weights as anonymous memory (docs/MEASUREMENTS.md, "Loading a quantized GGUF"). A
mapped file's pages are file-backed: they come from the page cache, are shared by every process that maps the
file, and the kernel can drop them under pressure, as llama.cpp's mapped GGUF's are. JAX adopts a page-aligned,
read-only NumPy view on the CPU device without a copy (jax.device_put's zero-copy path), so nothing is copied.
The mapping is PROT_READ: a program that tried to write into a weight would fault, never change the file.

File layout: a 64-byte prefix (magic, format version, header length and CRC-32, where the data starts, the
file's total size), a JSON header, then each buffer at a 4096-byte-aligned offset. The header holds the source
file's identity (resolved path, size, mtime_ns, inode, device), LAYOUT_VERSION, corejax's version and the native
kernel build (ffi.library_key, which changes with the repack's sources), the buffers (offset, dtype, shape, the
CRC-32 of their first and last 4 KiB) and the params tree (dicts, lists, QuantArrays, arrays, layer slots of
stacked arrays). A file that disagrees with any of it, or whose size or CRCs do not match, is not used (and is
deleted, so the next load rewrites it). The data pages are not checksummed as a whole: that would read the whole
file on every load, which is what the cache exists to avoid. The prefix is written last, so a file cut short by
a crash or a full disk never validates; a finished file is renamed into place (atomic).

COREJAX_WEIGHTS_CACHE=0 turns it off. Where the file is, and a sandboxed worker's staging folder (the worker
reads the model's cache file, and writes a new one only there, which its parent moves into place):
corejax/types/weights_file.py, which the parent, never importing JAX, shares.
"""

from __future__ import annotations

import json
import mmap
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corejax.types.weights_file import (
    ALIGN,
    ENV,
    FORMAT,
    MAGIC,
    MAX_HEADER,
    PREFIX,
    PREFIX_BYTES,
    CachePlan,
    cache_file,
    cache_key,
    enabled,
    identity,
    prune,
)

_SAMPLE = 4096  # bytes at each end of a buffer whose CRC-32 the header keeps
_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float16", "float32")
_FREE_MARGIN = 1 << 30  # a cache is not written where it would leave less than this free on the disk


def default_plan(source: Path) -> CachePlan | None:
    """In-process: read and write the file cache_file names; None when the cache is off."""
    from corejax.kernels import ffi

    if not enabled():
        return None
    path = cache_file(source, ffi.library_key())
    return CachePlan(path, path)


def load_or_build(plan: CachePlan | None, source: Path, build: Callable[[], Any],
                  check: Callable[[Any], str] = lambda params: "") -> tuple[Any, dict[str, str]]:
    """-> (params, what the cache did): mapped from plan.read where that file is valid; else build(), written to
    plan.write and mapped back from it (the built copy then freed), or build()'s own params where the cache is off
    or cannot be written (a full disk, a read-only folder: today's path, and the status says why).
    status: "hit", "written", "off" or "not written"; detail: why, for the last two and for a rejected file.
    check(params) -> why mapped params do not fit the model's config ("" when they do): such a file is rejected."""
    import jax

    from corejax.hostmem import trim_heap
    from corejax.kernels import ffi

    if plan is None:
        return build(), {"status": "off", "detail": f"{ENV}=0 or Session(weights_cache=False)"}
    if jax.local_devices()[0].platform != "cpu":
        return build(), {"status": "off", "detail": "the device's memory is not this process's"}
    kernels = ffi.library_key()
    params, why = load(plan.read, source, kernels)
    bad = check(params) if params is not None else ""
    if bad:
        release(params)
        params, why = _reject(plan.read, bad)
    if params is not None:
        return params, {"status": "hit", "detail": "", "file": str(plan.read)}
    built = build()
    if plan.write is None:
        return built, {"status": "not written", "detail": f"{why}; the cache folder is not writable"}
    failed = store(built, source, kernels, plan.write)
    if failed:
        return built, {"status": "not written", "detail": f"{why}; {failed}"}
    mapped, bad = load(plan.write, source, kernels)
    if mapped is None:
        return built, {"status": "not written", "detail": f"{why}; written, then {bad}"}
    release(built)
    trim_heap()
    return mapped, {"status": "written", "detail": why, "file": str(plan.read)}  # a worker's: moved there


# --- writing ----------------------------------------------------------------------------------------------


class _NotCacheable(Exception):
    pass


def _describe(params: Any) -> tuple[Any, list[Any]]:
    """params -> (the JSON tree, the host arrays its buffers are, in order)."""
    import jax
    import numpy as np

    from corejax.weights.arena import Slot
    from corejax.weights.quant import QuantArray

    buffers: list[Any] = []
    index: dict[int, int] = {}

    def buffer(a: Any) -> int:
        if id(a) not in index:
            host = np.asarray(a)
            if host.dtype.name not in _DTYPES:
                raise _NotCacheable(f"a {host.dtype.name} array")
            index[id(a)] = len(buffers)
            buffers.append((a, np.ascontiguousarray(host)))
        return index[id(a)]

    def node(v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                raise _NotCacheable("a dict with non-string keys")
            return {"t": "dict", "items": {k: node(x) for k, x in v.items()}}
        if isinstance(v, list):
            return {"t": "list", "items": [node(x) for x in v]}
        if isinstance(v, QuantArray):
            return {"t": "quant", "codes": node(v.codes), "scales": node(v.scales), "mins": node(v.mins),
                    "shape": list(v.shape), "block": v.block, "bits": v.bits, "offset": v.offset, "fmt": v.fmt,
                    "code_max": v.code_max}
        if isinstance(v, Slot):
            return {"t": "slot", "buf": buffer(v.owner), "index": v.index}
        if isinstance(v, (jax.Array, np.ndarray)):
            return {"t": "array", "buf": buffer(v)}
        raise _NotCacheable(f"a {type(v).__name__} value")

    return node(params), [host for _, host in buffers]


def _crc(view: memoryview) -> tuple[int, int]:
    return zlib.crc32(view[:_SAMPLE]), zlib.crc32(view[-_SAMPLE:])


def store(params: Any, source: Path, kernels: str, dest: Path) -> str:
    """Writes params to `dest` (a temporary name beside it, then a rename). Returns "" once written, else why
    not (params holding a value the format does not know, a full disk, a read-only or missing folder)."""
    try:
        tree, hosts = _describe(params)
    except _NotCacheable as e:
        return f"the params hold {e}"
    buffers = []
    for h in hosts:
        data = memoryview(h.reshape(-1).view("uint8")) if h.size else memoryview(b"")
        buffers.append({"dtype": h.dtype.name, "shape": list(h.shape), "nbytes": h.nbytes, "offset": 10**15,
                        "crc": list(_crc(data)) if h.nbytes else [0, 0]})
    header = {"key": cache_key(identity(source), kernels), "buffers": buffers, "tree": tree}
    # Sized with placeholder offsets at least as wide as the real ones, so the real header fits before `start`.
    start = -(-(PREFIX_BYTES + len(json.dumps(header).encode())) // ALIGN) * ALIGN
    end = start
    for b in buffers:
        b["offset"] = end
        end = -(-(end + b["nbytes"]) // ALIGN) * ALIGN
    offsets = [b["offset"] for b in buffers]
    blob = json.dumps(header).encode()
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(dest.parent)
        if st.f_bavail * st.f_frsize < end + _FREE_MARGIN:
            return f"{dest.parent} has {st.f_bavail * st.f_frsize >> 20} MiB free, under the {end >> 20} MiB " \
                   f"the cache needs plus {_FREE_MARGIN >> 20} MiB"
        with open(tmp, "wb") as f:
            f.write(b"\0" * PREFIX_BYTES + blob)  # the prefix stays zero (invalid) until the data is in
            for h, off in zip(hosts, offsets, strict=True):
                f.seek(off)
                f.write(memoryview(h.reshape(-1).view("uint8")))
            f.truncate(end)
            f.seek(0)
            f.write(PREFIX.pack(MAGIC, FORMAT, len(blob), zlib.crc32(blob), start, end))
        os.replace(tmp, dest)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return f"writing {dest} failed ({e.strerror or e})"
    prune(dest)
    return ""


# --- reading ----------------------------------------------------------------------------------------------


class _Invalid(Exception):
    pass


def _header(mm: mmap.mmap, size: int) -> dict:
    if size < PREFIX_BYTES:
        raise _Invalid(f"{size} bytes, shorter than its prefix")
    magic, fmt, n, crc, start, total = PREFIX.unpack_from(mm, 0)
    if magic != MAGIC or fmt != FORMAT:
        raise _Invalid("not a finished weights-cache file of this format")
    if total != size or not PREFIX_BYTES + n <= start <= size or n > MAX_HEADER or start % ALIGN:
        raise _Invalid(f"its sizes do not fit the file ({size} bytes; header says {total})")
    blob = mm[PREFIX_BYTES:PREFIX_BYTES + n]
    if zlib.crc32(blob) != crc:
        raise _Invalid("its header's checksum does not match")
    try:
        header = json.loads(blob)
    except ValueError as e:
        raise _Invalid(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("buffers"), list):
        raise _Invalid("its header has no buffer table")
    header["_start"] = start
    return header


def _views(mm: mmap.mmap, header: dict, size: int) -> list[Any]:
    import numpy as np

    out = []
    for b in header["buffers"]:
        try:
            dtype, shape, off, nbytes, crc = np.dtype(b["dtype"]), tuple(b["shape"]), b["offset"], b["nbytes"], b["crc"]
        except (KeyError, TypeError) as e:
            raise _Invalid(f"a buffer entry is malformed ({e})") from None
        if b["dtype"] not in _DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape) or \
                not isinstance(off, int) or not isinstance(nbytes, int):
            raise _Invalid("a buffer entry is malformed")
        count = 1
        for d in shape:
            count *= d
        if count * dtype.itemsize != nbytes or off % ALIGN or off < header["_start"] or off + nbytes > size:
            raise _Invalid(f"a buffer ({b['dtype']} {list(shape)} at {off}) does not fit the file")
        view = np.frombuffer(mm, np.uint8, nbytes, off)
        if nbytes and [zlib.crc32(view[:_SAMPLE]), zlib.crc32(view[-_SAMPLE:])] != crc:
            raise _Invalid(f"the buffer at {off} does not match its checksum")
        out.append(view.view(dtype).reshape(shape))
    return out


def _build(tree: Any, views: list[Any]) -> Any:
    """The params from the header's tree: every array a zero-copy jax.Array over the mapping."""
    import jax

    from corejax.weights.arena import Slot
    from corejax.weights.quant import QuantArray

    device = jax.local_devices()[0]
    arrays: dict[int, Any] = {}

    def array(k: Any) -> Any:
        if not isinstance(k, int) or not 0 <= k < len(views):
            raise _Invalid(f"a reference to buffer {k!r} of {len(views)}")
        if k not in arrays:
            a = jax.device_put(views[k], device)
            if views[k].nbytes and a.unsafe_buffer_pointer() != views[k].ctypes.data:
                raise _Invalid("JAX copied a mapped buffer instead of adopting it")
            arrays[k] = a
        return arrays[k]

    def node(v: Any) -> Any:
        if v is None:
            return None
        if not isinstance(v, dict):
            raise _Invalid("a malformed tree node")
        t = v.get("t")
        if t == "dict" and isinstance(v.get("items"), dict):
            return {str(k): node(x) for k, x in v["items"].items()}
        if t == "list" and isinstance(v.get("items"), list):
            return [node(x) for x in v["items"]]
        if t == "array":
            return array(v.get("buf"))
        if t == "slot":
            owner, i = array(v.get("buf")), v.get("index")
            if not isinstance(i, int) or owner.ndim == 0 or not 0 <= i < owner.shape[0]:
                raise _Invalid(f"a slot {i!r} outside its stacked array")
            slot = views[v["buf"]][i].view(Slot)
            slot.owner, slot.index = owner, i
            return slot
        if t == "quant":
            shape, ints = v.get("shape"), [v.get(k) for k in ("block", "bits", "offset", "code_max")]
            if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) for d in shape + ints)
                    and isinstance(v.get("fmt"), str) and v["bits"] in (4, 8)):
                raise _Invalid("a malformed quantized matrix")
            q = QuantArray(codes=node(v.get("codes")), scales=node(v.get("scales")), mins=node(v.get("mins")),
                           shape=tuple(shape), block=v["block"], bits=v["bits"], offset=v["offset"], fmt=v["fmt"],
                           code_max=v["code_max"])
            _check_layout(q)
            return q
        raise _Invalid(f"an unknown tree node {t!r}")

    return node(tree)


def _check_layout(q: Any) -> None:
    """A mapped QuantArray's arrays have the shapes its static fields imply (weights/quant.py's layout), so no
    kernel is handed a matrix its buffers do not hold."""
    d_in, d_out = q.shape
    groups = -(-d_out // 16)
    codes, scales = tuple(q.codes.shape), tuple(q.scales.shape)
    ok = (q.block in (16, 32) and d_in > 0 and d_out > 0 and d_in % 32 == 0 and 0 <= q.offset <= 255
          and 0 <= q.code_max <= 255 and len(codes) >= 3 and codes[-3:] == (groups, d_in * q.bits // 32, 64)
          and scales[-3:] == (groups, d_in // q.block, 16) and codes[:-3] == scales[:-3]
          and (q.mins is None or tuple(q.mins.shape) == scales))
    if not ok:
        raise _Invalid(f"a quantized matrix {q.shape} whose arrays ({codes}, {scales}) do not fit its layout")


def load(path: Path, source: Path, kernels: str) -> tuple[Any, str]:
    """-> (params, "") from a valid cache file of `source`, or (None, why not). A file found and rejected is
    deleted (where this process may), so the next load writes a good one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None, "miss: no cache file yet"
    except OSError as e:
        return None, f"miss: {path} cannot be opened ({e.strerror})"
    try:
        size = os.fstat(fd).st_size
        if size < PREFIX_BYTES:
            raise _Invalid(f"{size} bytes, shorter than its prefix")
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except (OSError, ValueError, _Invalid) as e:
        os.close(fd)
        return _reject(path, f"{e}")
    os.close(fd)  # the mapping keeps the file
    try:
        header = _header(mm, size)
        if header.get("key") != cache_key(identity(source), kernels):
            raise _Invalid("it was made from another file, version or kernel build")
        return _build(header.get("tree"), _views(mm, header, size)), ""
    except (_Invalid, OSError, ValueError, TypeError, KeyError) as e:
        return _reject(path, f"{e}")


def probe(plan: CachePlan | None, source: Path) -> bool:
    """Whether plan.read looks like a valid cache of `source` (its prefix, header and key; not its buffers), for
    the memory budget before loading: a hit maps the file, with no repacking transient."""
    from corejax.kernels import ffi

    if plan is None:
        return False
    try:
        with open(plan.read, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        try:
            return _header(mm, size).get("key") == cache_key(identity(source), ffi.library_key())
        finally:
            mm.close()
    except (OSError, ValueError, _Invalid):
        return False


def _reject(path: Path, why: str) -> tuple[None, str]:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
    return None, f"unusable: {path.name}: {why}"


def release(params: Any) -> None:
    """Deletes the device arrays params holds (the repacked copy a freshly written cache replaces)."""
    import jax

    from corejax.weights.arena import Slot

    def drop(a: Any) -> None:
        a = a.owner if isinstance(a, Slot) else a
        if isinstance(a, jax.Array) and not a.is_deleted():
            a.delete()

    for leaf in jax.tree.leaves(params):
        drop(leaf)
