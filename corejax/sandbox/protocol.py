"""The parent <-> worker wire format: length-prefixed binary frames, a typed header, msgpack payloads.

A frame is a 20-byte header followed by `length` bytes of msgpack:

    magic b"CJX\\x00" | version u8 | kind u8 | flags u16 | request id u64 | length u32   (little-endian)

msgpack (not pickle) because the parent decodes what a possibly compromised worker sends: msgpack builds
only dicts, lists, strings, numbers and bytes, so decoding can never run code. Arrays travel as one msgpack
extension (dtype, shape, raw bytes) and come back as read-only numpy views of the received bytes. Sizes are
checked before anything is allocated: a header that announces more than `max_frame` bytes is rejected.
What the payloads mean, typed, is corejax/sandbox/messages.py.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import socket
import struct
import threading
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

MAGIC = b"CJX\x00"
VERSION = 1
HEADER = struct.Struct("<4sBBHQI")  # magic, version, kind, flags, request id, payload length
MAX_FRAME = 16 << 20  # a chunk is a few hundred bytes; info a few KiB; 16 MiB leaves room for arrays
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


class Kind(enum.IntEnum):
    """What a frame is. Requests go parent -> worker, replies worker -> parent, both carry the request id."""

    # parent -> worker
    GENERATE = 1  # {prompt, messages, sampling}
    TOKENIZE = 2  # {text, add_special}
    DETOKENIZE = 3  # {ids: array}
    INFO = 4  # {}
    PING = 5  # {}: the empty request (round-trip benchmark)
    CANCEL = 6  # {}: stop the request with this id (the caller stopped reading)
    SHUTDOWN = 7  # {}
    RUN_TEST = 8  # {target, args}: honoured only by a worker started through corejax.sandbox.testing
    EMBED = 9  # {texts, truncate} -> {embeddings: array [n, D]}
    CLASSIFY = 10  # {texts, labels, head: [W, b] | None, multi_label, template, truncate} -> {labels, scores}
    DESCRIBE = 11  # {} -> {info}: the model file's header (`corejax info`), from a worker that loads nothing
    # worker -> parent
    READY = 32  # {pid, report, info}: policy applied and model loaded
    STARTED = 33  # {}: the worker began this request (requests not started survive a crash)
    CHUNK = 34  # {text, tokens, logprobs}
    RESULT = 35  # {result} / {value}: the request is complete
    ERROR = 36  # {type, message}: the request (id 0: the worker) failed
    PROGRESS = 37  # {stage, done, total}: startup progress (id 0): "loading weights", "compiling"
    ENDED = 38  # {ended, message}: a kept server's worker never finished this request (messages.Terminal)


# Per-kind payload caps for what a worker sends (the parent bounds what a hostile worker can make it hold);
# the other kinds get the connection's max_frame.
KIND_LIMITS = {Kind.STARTED: 256, Kind.PROGRESS: 4 << 10, Kind.ERROR: 64 << 10, Kind.ENDED: 64 << 10,
               Kind.READY: 1 << 20, Kind.CHUNK: 1 << 20}


class ProtocolError(Exception):
    """A frame that breaks the protocol: bad magic, unknown version or kind, oversize, undecodable."""


@dataclasses.dataclass(frozen=True)
class Frame:
    kind: Kind
    rid: int
    payload: dict
    flags: int = 0


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
# shape shares them. Encoding a frame right after a model step runs on cold caches (72 us in the sandboxed
# worker for a RESULT that takes 8.8 us in a loop), so the fewer Python steps per array, the better.
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


def encode(kind: Kind, rid: int, payload: Mapping[str, Any] | None = None, flags: int = 0) -> bytes:
    """One frame as bytes."""
    body = pack(payload or {})
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"a {Kind(kind).name} payload of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(MAGIC, VERSION, kind, flags, rid, len(body)) + body


def decode_header(header: bytes, max_frame: int = MAX_FRAME) -> tuple[Kind, int, int, int]:
    """(kind, request id, flags, payload length) of a 20-byte header, or ProtocolError."""
    magic, version, kind, flags, rid, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (not a corejax sandbox frame)")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} (this side speaks {VERSION})")
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None
    limit = min(max_frame, KIND_LIMITS.get(kind, max_frame))
    if length > limit:
        raise ProtocolError(f"a {kind.name} frame of {length} bytes exceeds its {limit}-byte limit")
    return kind, rid, flags, length


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


def decode(frame: bytes, max_frame: int = MAX_FRAME) -> Frame:
    """One complete frame (header + payload) from bytes."""
    if len(frame) < HEADER.size:
        raise ProtocolError(f"a frame needs {HEADER.size} header bytes; got {len(frame)}")
    kind, rid, flags, length = decode_header(frame[:HEADER.size], max_frame)
    if len(frame) != HEADER.size + length:
        raise ProtocolError(f"the header announces {length} payload bytes; {len(frame) - HEADER.size} follow")
    return Frame(kind, rid, decode_payload(frame[HEADER.size:]), flags)


class Connection:
    """Frames over a connected stream socket: send is thread-safe; recv is for one reading thread at a time
    (the parent's callers pass the reading on among themselves: WorkerClient.wait)."""

    def __init__(self, sock: socket.socket, max_frame: int = MAX_FRAME):
        self.sock = sock
        self.max_frame = max_frame
        self._send_lock = threading.Lock()
        self._received = bytearray()  # bytes read but not yet returned as a frame

    def send(self, kind: Kind, rid: int = 0, payload: Mapping[str, Any] | None = None, flags: int = 0) -> None:
        data = encode(kind, rid, payload, flags)
        with self._send_lock:
            self.sock.sendall(data)

    def _fill(self, want: int) -> bool:
        """Reads what has arrived (at least one byte, blocking) into the buffer; False at end of stream."""
        data = self.sock.recv(max(want - len(self._received), 1 << 16))
        self._received += data
        return bool(data)

    def recv(self) -> Frame | None:
        """The next frame, or None when the other side closed the connection cleanly between frames.

        Bytes are kept in a buffer until their frame is complete, so a reader interrupted mid-frame (a
        KeyboardInterrupt in the caller that was reading: client.WorkerClient.wait) leaves the stream intact
        for the next reader; one read often brings a whole small frame."""
        buf = self._received
        while len(buf) < HEADER.size:
            if not self._fill(HEADER.size):
                if not buf:
                    return None
                raise ProtocolError(f"the connection closed inside a frame ({len(buf)} of {HEADER.size} bytes)")
        kind, rid, flags, length = decode_header(bytes(buf[:HEADER.size]), self.max_frame)
        end = HEADER.size + length
        while len(buf) < end:
            if not self._fill(end):
                raise ProtocolError(f"the connection closed inside a frame ({len(buf)} of {end} bytes)")
        body = bytes(buf[HEADER.size:end])
        del buf[:end]
        return Frame(kind, rid, decode_payload(body), flags)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
