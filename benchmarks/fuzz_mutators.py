"""Structure-aware mutators for benchmarks/fuzz.py's atheris targets: JSON documents (config.json, requests,
tokenizer files, a safetensors header) and worker frames are decoded, their values swapped for hostile ones, and
encoded again, so libFuzzer reaches past the parsers' first checks."""

from __future__ import annotations

import json
import struct

# Values a hostile file or request puts where a parser expects something else.
_HOSTILE = (None, True, False, 0, -1, 1, 7, 2**31, 2**63, -2**63, 10**30, 1e308, -1e-308, 0.5, float("nan"), "", "x",
            "\udcff", "a" * 300, [], [1], [-1, 2], [[]], ["x"], {}, {"a": 1}, {"type": "x"}, [0] * 40, "F32", "Q4_0",
            "llama", "LlamaForCausalLM", "BPE", "ByteLevel")


def _nodes(obj, out: list, depth: int = 0) -> list:
    """(container, key) of every value in a parsed JSON document."""
    if depth > 12:
        return out
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        out.append((obj, key))
        _nodes(value, out, depth + 1)
    return out


def _mutate_json(doc, rng):
    nodes = _nodes(doc, [])
    if not nodes:
        return rng.choice(_HOSTILE)
    for _ in range(rng.randint(1, 3)):
        container, key = rng.choice(nodes)
        action = rng.random()
        try:
            if action < 0.55:
                container[key] = rng.choice(_HOSTILE)
            elif action < 0.7 and isinstance(container, dict):
                del container[key]
            elif action < 0.8:
                container[key] = [container[key]]
            elif action < 0.9 and isinstance(container, dict):
                container[rng.choice(("shape", "dtype", "data_offsets", "id", "type", "vocab", "merges",
                                      "model_type", "hidden_size", "rope_scaling", "messages", "content"))] = \
                    rng.choice(_HOSTILE)
            else:
                container[key] = {"x": container[key]} if rng.random() < 0.5 else container[key] * 2 \
                    if isinstance(container[key], (str, list)) else -container[key] \
                    if isinstance(container[key], (int, float)) and not isinstance(container[key], bool) else None
        except (KeyError, IndexError, TypeError):
            pass
    return doc


def json_mutator(split):
    """A custom mutator for JSON inputs: most of the time a parsed document with values swapped for hostile
    ones, keys dropped or added, values wrapped; otherwise libFuzzer's own byte mutations. split/join take the
    input apart into (prefix bytes, JSON parts) and back (a safetensors file's length field, a tokenizer's two
    files)."""
    import random

    import atheris

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.25:
            return atheris.Mutate(data, max_size)
        try:
            parts = split(data)
            i = rng.randrange(len(parts))
            doc = json.loads(parts[i])
        except Exception:  # noqa: BLE001 - not JSON (any more): bytes then
            return atheris.Mutate(data, max_size)
        parts[i] = json.dumps(_mutate_json(doc, rng)).encode()
        out = split.join(parts, rng)
        return out if len(out) <= max_size else atheris.Mutate(data, max_size)

    return mutate


class _Plain:
    @staticmethod
    def __call__(data: bytes) -> list:
        return [data]

    @staticmethod
    def join(parts: list, rng) -> bytes:
        return parts[0]


class _Tokenizer(_Plain):
    @staticmethod
    def __call__(data: bytes) -> list:
        return list(data.split(b"\n\x00\n", 1)) if b"\n\x00\n" in data else [data]

    @staticmethod
    def join(parts: list, rng) -> bytes:
        return b"\n\x00\n".join(parts)


class _Safetensors(_Plain):
    @staticmethod
    def __call__(data: bytes) -> list:
        n = struct.unpack("<Q", data[:8])[0]
        return [data[8:8 + n], data[8 + n:]] if n <= len(data) - 8 else [data[8:]]

    @staticmethod
    def join(parts: list, rng) -> bytes:
        body = parts[1] if len(parts) > 1 and not parts[1].startswith((b"{", b"[")) else bytes(24)
        n = len(parts[0]) if rng.random() < 0.9 else rng.choice((0, 1, len(parts[0]) + 8, 2**63))
        return struct.pack("<Q", n % 2**64) + parts[0] + body


def frame_mutator():
    """Frames decoded, their payload mutated as a JSON document is (msgpack carries the same shapes, plus arrays),
    and encoded again with a valid header; sometimes another kind, sometimes libFuzzer's byte mutations."""
    import random

    import atheris

    from corejax.wire.protocol import Kind, decode, encode

    kinds = [Kind.CHUNK, Kind.RESULT, Kind.ERROR, Kind.ENDED]

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.2 or len(data) < 2:
            return atheris.Mutate(data, max_size)
        try:
            frame = decode(data[1:])
        except Exception:  # noqa: BLE001 - broken (by a byte mutation): bytes then
            return atheris.Mutate(data, max_size)
        kind = rng.choice(kinds) if rng.random() < 0.1 else frame.kind
        try:
            out = bytes([rng.randrange(256) if rng.random() < 0.2 else data[0]]) + encode(
                kind, frame.rid, _mutate_json(dict(frame.payload), rng))
        except Exception:  # noqa: BLE001 - a value the encoder refuses
            return atheris.Mutate(data, max_size)
        return out if len(out) <= max_size else atheris.Mutate(data, max_size)

    return mutate


MUTATORS = {"config": _Plain(), "request": _Plain(), "tokenizer": _Tokenizer(), "safetensors": _Safetensors()}
