"""The sandbox wire format: round trips of every message type, and rejection of malformed or oversize frames."""

from __future__ import annotations

import socket
import struct
import threading

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corejax.types.options import SamplingParams
from corejax.types.results import Chunk, GenerationResult, Timings, TokenLogprob
from corejax.wire import codec
from corejax.wire import messages as m
from corejax.wire import protocol as p
from corejax.wire.protocol import HEADER, MAGIC, VERSION, Connection, Kind, ProtocolError


def _result(logprobs=True) -> GenerationResult:
    lp = (TokenLogprob(5, "a", -0.25, ((5, -0.25), (7, -1.5)), ("a", "b")), TokenLogprob(9, "é", -2.0, ()))
    return GenerationResult("aé", (5, 9), "stop", (1, 2, 3), Timings(0.5, 3, 0, 2, 0.1, 30.0, 12.5, 0.3),
                            lp if logprobs else None)


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind):
    frame = p.decode(p.encode(kind, 2**40 + 7, {"x": [1, "é", b"\x00\xff", None, 1.5, True]}, flags=3))
    assert (frame.kind, frame.rid, frame.flags) == (kind, 2**40 + 7, 3)
    assert frame.payload == {"x": [1, "é", b"\x00\xff", None, 1.5, True]}


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint8", "int32", "int64", "float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (1, 2, 3, 1)])
def test_arrays_round_trip_with_dtype_and_shape(dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 3).astype(dtype).reshape(shape)
    out = p.decode(p.encode(Kind.RESULT, 1, {"a": a}))
    b = out.payload["a"]
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    assert not b.flags.writeable  # a view of the received bytes, never a copy the worker could alias


def test_non_contiguous_and_big_endian_arrays_are_sent_as_values():
    a = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]
    b = p.decode(p.encode(Kind.RESULT, 1, {"a": a})).payload["a"]
    assert np.array_equal(a, b)


def test_object_arrays_and_arbitrary_objects_are_refused():
    with pytest.raises(TypeError, match="object"):
        p.encode(Kind.RESULT, 1, {"a": np.array([object()])})
    with pytest.raises(TypeError, match="cannot send"):
        p.encode(Kind.RESULT, 1, {"a": object()})


def test_typed_payloads_round_trip():
    sp = SamplingParams.from_kwargs(temperature=0.5, top_k=3, stop=["\n", "x"], seed=7, logprobs=2, max_tokens=9)
    wire = p.decode(p.encode(Kind.GENERATE, 1, {"sampling": m.sampling_to_wire(sp)})).payload["sampling"]
    assert m.sampling_from_wire(wire) == sp
    chunk = Chunk("hé", (1, 2), _result().logprobs)
    wire = p.decode(p.encode(Kind.CHUNK, 1, m.chunk_to_wire(chunk))).payload
    assert m.chunk_from_wire(wire) == chunk
    for result in (_result(), _result(logprobs=False)):
        wire = p.decode(p.encode(Kind.RESULT, 1, {"result": m.result_to_wire(result)})).payload["result"]
        assert m.result_from_wire(wire) == result


def _header(magic=MAGIC, version=VERSION, kind=Kind.PING, rid=1, length=0) -> bytes:
    return HEADER.pack(magic, version, kind, 0, rid, length)


REQUESTS = [
    m.Generate("hi", None, SamplingParams.from_kwargs(temperature=0.0, regex="[0-9]+"), {"method": "ngram", "k": 2}),
    m.Generate(None, [{"role": "user", "content": "hi"}], SamplingParams()),
    m.Tokenize("héllo", False), m.Embed(["a", "b"], False),
    m.Classify(["x"], ["pos", "neg"], (np.ones((3, 2), np.float32), np.zeros(2, np.float32)), True, None, True),
]


@pytest.mark.parametrize("msg", REQUESTS, ids=lambda m: type(m).__name__)
def test_each_request_kind_has_one_codec_and_round_trips(msg):
    frame = p.decode(p.encode(msg.KIND, 7, msg.to_wire()))
    got = m.read_request(frame)
    assert type(got) is type(msg)
    if isinstance(msg, m.Classify):
        assert got.texts == msg.texts and got.labels == msg.labels and np.array_equal(got.head[0], msg.head[0])
    else:
        assert got == msg
    ids = m.read_request(p.decode(p.encode(Kind.DETOKENIZE, 1, m.Detokenize(np.arange(5)).to_wire())))
    assert ids.ids.tolist() == list(range(5))
    assert m.read_request(p.decode(p.encode(Kind.INFO, 1, {}))) == m.Empty(Kind.INFO)


@pytest.mark.parametrize("kind, payload", [
    (Kind.TOKENIZE, {"text": 5}), (Kind.GENERATE, {"prompt": "x"}), (Kind.EMBED, {"texts": "abc"}),
    (Kind.CLASSIFY, {"texts": ["a"], "head": [1]}),
])
def test_malformed_requests_are_protocol_errors(kind, payload):
    with pytest.raises(ProtocolError, match=kind.name):
        m.read_request(p.decode(p.encode(kind, 1, payload)))


@pytest.mark.parametrize("kind, result", [
    (Kind.TOKENIZE, m.Tokens([1, 2, 3])), (Kind.DETOKENIZE, m.Text("abc")), (Kind.INFO, m.Info({"a": 1})),
    (Kind.PROBE, m.Value([1, 2])),
])
def test_results_round_trip_and_reject_the_wrong_shape(kind, result):
    assert m.read_result(kind, p.decode(p.encode(Kind.RESULT, 1, result.to_wire())).payload) == result
    with pytest.raises(ProtocolError, match="result"):
        m.read_result(kind, {"unexpected": True} if kind != Kind.PROBE else [])


@pytest.mark.parametrize("frame, match", [
    (_header(magic=b"HTTP"), "magic"),
    (_header(version=VERSION + 1), "version"),
    (_header(kind=200), "unknown message kind"),
    (_header(length=5) + b"\x80", "announces 5"),
    (b"CJX", "header bytes"),
    (_header(length=1) + b"\xc1", "undecodable"),  # 0xc1 is never valid msgpack
    (_header(length=2) + msgpack.packb([1]), "must be a map"),
    (_header(length=len(msgpack.packb({1: 2}))) + msgpack.packb({1: 2}), "undecodable"),  # non-string keys
])
def test_malformed_frames_raise_protocol_error(frame, match):
    with pytest.raises(ProtocolError, match=match):
        p.decode(frame)


def _array_head(head: list) -> bytes:
    packed = msgpack.packb(head)
    return struct.pack("<I", len(packed)) + packed


def _ext_frame(data: bytes, code: int = 1) -> bytes:
    body = msgpack.packb({"a": msgpack.ExtType(code, data)})
    return _header(length=len(body)) + body


@pytest.mark.parametrize("data, code, match", [
    (b"", 1, "truncated"),
    (struct.pack("<I", 99) + b"xx", 1, "longer than"),
    (_array_head(["object", [1]]), 1, "bad array header"),
    (_array_head(["int32", [-1]]), 1, "bad array header"),
    (_array_head(["int32", [1] * 9]) + b"\0" * 4, 1, "bad array header"),
    (_array_head(["int32", [4]]) + b"\0" * 15, 1, "does not match"),
    (b"abc", 9, "extension type 9"),
    (_array_head(["int8", [2**32, 2**32]]), 1, "does not match"),  # an int64 product would wrap to 0
])
def test_malformed_arrays_raise_protocol_error(data, code, match):
    with pytest.raises(ProtocolError, match=match):
        p.decode(_ext_frame(data, code))


def test_oversize_frames_are_refused_before_reading_the_payload():
    with pytest.raises(ProtocolError, match="exceeds"):
        p.decode_header(_header(length=p.MAX_FRAME + 1))
    a, b = socket.socketpair()
    try:
        a.sendall(_header(length=2**32 - 1))  # announces 4 GiB and sends nothing: must not wait or allocate
        b.settimeout(5)
        with pytest.raises(ProtocolError, match="exceeds"):
            Connection(b).recv()
        with pytest.raises(ProtocolError, match="exceeds"):
            p.encode(Kind.RESULT, 1, {"blob": b"\0" * (p.MAX_FRAME + 1)})
        small = Connection(b, max_frame=64)
        a.sendall(p.encode(Kind.RESULT, 1, {"blob": b"\0" * 100}))
        with pytest.raises(ProtocolError, match="exceeds its 64-byte"):
            small.recv()
    finally:
        a.close()
        b.close()


def test_connection_interleaves_requests_and_detects_truncation():
    a, b = socket.socketpair()
    ca, cb = Connection(a), Connection(b)
    sent = [(Kind.CHUNK if i % 3 else Kind.RESULT, 1 + i % 4, {"i": i, "t": "x" * i}) for i in range(200)]

    def writer(part):
        for kind, rid, payload in part:
            ca.send(kind, rid, payload)

    threads = [threading.Thread(target=writer, args=(sent[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    got = [cb.recv() for _ in sent]
    for t in threads:
        t.join()
    # Frames from two threads never tear into each other; each thread's frames stay in order.
    assert sorted(f.payload["i"] for f in got) == list(range(200))
    for i in range(2):
        mine = [f.payload["i"] for f in got if f.payload["i"] % 2 == i]
        assert mine == sorted(mine)
    a.sendall(p.encode(Kind.CHUNK, 1, {"text": "abc"})[:-2])
    a.close()
    with pytest.raises(ProtocolError, match="closed inside a frame"):
        cb.recv()
    b.close()


def test_a_read_interrupted_mid_frame_resumes_where_it_stopped():
    """A caller reading the socket may be interrupted (KeyboardInterrupt; here a timeout) inside a frame: the
    bytes it took stay buffered, and the next recv returns the whole frame, then the next one."""
    a, b = socket.socketpair()
    cb = Connection(b)
    frame = p.encode(Kind.CHUNK, 7, {"text": "x" * 5000})
    a.sendall(frame[:11])  # part of the header
    b.settimeout(0.2)
    with pytest.raises(TimeoutError):
        cb.recv()
    a.sendall(frame[11:3000])  # the rest of the header and part of the body
    with pytest.raises(TimeoutError):
        cb.recv()
    a.sendall(frame[3000:] + p.encode(Kind.RESULT, 7, {"n": 1}))
    got = cb.recv()
    assert (got.kind, got.rid, got.payload) == (Kind.CHUNK, 7, {"text": "x" * 5000})
    assert cb.recv().payload == {"n": 1}
    a.close()
    b.close()


def test_clean_close_between_frames_is_end_of_stream():
    a, b = socket.socketpair()
    Connection(a).send(Kind.PING, 3)
    a.close()
    cb = Connection(b)
    assert cb.recv().kind == Kind.PING
    assert cb.recv() is None
    b.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_other_errors(data):
    for frame in (data, _header(length=len(data)) + data):
        try:
            p.decode(frame)
        except ProtocolError:
            pass


def test_only_plain_types_and_bounded_lengths_are_decoded():
    """Finding 11 (issue 17): a msgpack Timestamp comes out as integer nanoseconds, never an object; counts
    past the caps are refused before the unpacker allocates for them; each kind a worker sends has its cap."""
    body = msgpack.packb({"t": msgpack.Timestamp(5, 7)})
    assert p.decode(_header(length=len(body)) + body).payload == {"t": 5_000_000_007}
    for payload in ({"m": {str(i): 0 for i in range(codec.MAX_MAP_LEN + 1)}}, {"a": [0] * (codec.MAX_ARRAY_LEN + 1)}):
        body = msgpack.packb(payload)
        with pytest.raises(ProtocolError, match="undecodable"):
            p.decode(_header(length=len(body)) + body)
    for kind, limit in p.KIND_LIMITS.items():
        with pytest.raises(ProtocolError, match=f"{kind.name} frame .* exceeds its {limit}-byte"):
            p.decode_header(HEADER.pack(MAGIC, VERSION, kind, 0, 1, limit + 1))
        p.decode_header(HEADER.pack(MAGIC, VERSION, kind, 0, 1, limit))
