"""The parent <-> worker wire format: length-prefixed binary frames, a typed header, msgpack payloads.

A frame is a 20-byte header followed by `length` bytes of msgpack:

    magic b"CJX\\x00" | version u8 | kind u8 | flags u16 | request id u64 | length u32   (little-endian)

The payload codec (msgpack, never pickle: the parent decodes what a possibly compromised worker sends) is
corejax/wire/codec.py; what the payloads mean, typed, is corejax/wire/messages.py. Sizes are checked before
anything is allocated: a header that announces more than `max_frame` bytes is rejected.
"""

from __future__ import annotations

import dataclasses
import enum
import socket
import struct
import threading
from collections.abc import Mapping
from typing import Any

from corejax.wire.codec import ProtocolError, decode_payload, pack

MAGIC = b"CJX\x00"
VERSION = 1
HEADER = struct.Struct("<4sBBHQI")  # magic, version, kind, flags, request id, payload length
MAX_FRAME = 16 << 20  # a chunk is a few hundred bytes; info a few KiB; 16 MiB leaves room for arrays


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
    PROBE = 8  # {target, args}: tests only (tests/probe_worker.py runs it); a corejax worker refuses it
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


@dataclasses.dataclass(frozen=True)
class Frame:
    kind: Kind
    rid: int
    payload: dict
    flags: int = 0


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
