"""The payload codec of every frame (corejax/wire/protocol.py) and of the multi-host replay (corejax/engine/
distributed.py): msgpack, never pickle, because the side that decodes may be reading what a compromised worker
wrote. msgpack builds only dicts, lists, strings, numbers and bytes, so decoding can never run code; arrays
travel as one extension (dtype, shape, raw bytes) and come back as read-only numpy views of the received bytes.
Counts are checked before the unpacker allocates for them."""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

# msgpack lengths a frame may announce (strings and bytes are bounded by the frame itself): lists of tokens
# and logprobs, small maps. A count is checked before the unpacker allocates for it.
MAX_ARRAY_LEN = 1 << 20
MAX_MAP_LEN = 1 << 10

_ARRAY_EXT = 1
# Plain numeric dtypes only: an object dtype in a frame would be a way back to arbitrary Python objects.
_DTYPES = frozenset(
    ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32",
     "float64"])
_MAX_NDIM = 8
_LITTLE = {name: np.dtype(name).newbyteorder("<") for name in _DTYPES}  # the wire's byte order



class ProtocolError(Exception):
    """A frame that breaks the protocol: bad magic, unknown version or kind, oversize, undecodable."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, frozenset, set)):
        return list(obj)
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"cannot send a {type(obj).__name__} over the sandbox protocol")


def _pack_array(a: np.ndarray) -> msgpack.ExtType:
    head, little = _array_head(a.dtype, a.shape)
    return msgpack.ExtType(_ARRAY_EXT, head + a.astype(little, copy=False).tobytes(order="C"))


# Array headers are built and checked once per (dtype, shape): every embedding, score row and head of one
# shape shares them. Encoding a frame right after a model step runs on cold caches (several times slower than
# in a loop; docs/MEASUREMENTS.md), so the fewer Python steps per array, the better.
@functools.lru_cache(maxsize=256)
def _array_head(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[bytes, np.dtype]:
    """The length-prefixed header of an array of this dtype and shape, and the dtype it travels as."""
    name = dtype.name
    if name not in _DTYPES:
        raise TypeError(f"arrays of dtype {name} cannot cross the sandbox protocol")
    head = msgpack.packb([name, list(shape)])
    return struct.pack("<I", len(head)) + head, _LITTLE[name]


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _ARRAY_EXT:
        raise ProtocolError(f"unknown msgpack extension type {code}")
    if len(data) < 4:
        raise ProtocolError("truncated array header")
    (n,) = struct.unpack_from("<I", data)
    if n > len(data) - 4:
        raise ProtocolError("array header longer than the array")
    dtype, shape, nbytes = _read_head(bytes(data[4:4 + n]))
    body = memoryview(data)[4 + n:]
    if nbytes != len(body):
        raise ProtocolError(f"array of {dtype.name}{list(shape)} does not match its {len(body)} bytes")
    return np.frombuffer(body, dtype).reshape(shape)


@functools.lru_cache(maxsize=256)
def _read_head(head: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, byte count) of an array header, or ProtocolError (checked once per distinct header)."""
    try:
        name, shape = msgpack.unpackb(head, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises many types; all mean a bad frame
        raise ProtocolError(f"bad array header: {e}") from None
    if not isinstance(name, str) or name not in _DTYPES or not isinstance(shape, list) or len(shape) > _MAX_NDIM \
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"bad array header: dtype {name!r}, shape {shape!r}")
    dtype = _LITTLE[name]
    return dtype, tuple(shape), math.prod(shape) * dtype.itemsize  # Python integers: no int64 wrap-around


def pack(payload: Mapping[str, Any]) -> bytes:
    """A payload's msgpack bytes (arrays as extension values); decode_payload reads them back."""
    return msgpack.packb(payload, default=_default, use_bin_type=True)


def decode_payload(body: bytes) -> dict:
    try:
        # Only plain types come out: arrays through _ext_hook, msgpack timestamps as integer nanoseconds.
        payload = msgpack.unpackb(body, raw=False, ext_hook=_ext_hook, strict_map_key=True, use_list=True,
                                  timestamp=2, max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN)
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - msgpack raises many types; all mean a bad frame
        raise ProtocolError(f"undecodable payload: {type(e).__name__}: {e}") from None
    if not isinstance(payload, dict):
        raise ProtocolError(f"a payload must be a map; got {type(payload).__name__}")
    return payload
