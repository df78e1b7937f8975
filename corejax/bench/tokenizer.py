"""Tokenizer suite: encode and decode MB/s (UTF-8 bytes of text) of corejax's tokenizer beside the HF
`tokenizers` library and llama.cpp's tokenizer, on the same vocabulary, one call per ~1 KiB document.

corejax's Tokenizer is built on the host from the model file's tokenizer data (what the worker runs); the
HF tokenizer is transformers' conversion of the same GGUF vocabulary (or the folder's tokenizer.json),
called through `tokenizers` directly; llama.cpp loads the file with vocab_only. `agreement` is the
fraction of documents each peer tokenizes to exactly corejax's ids: a speed beside a different answer
would not be a comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from corejax.bench.child import PeerMissing, import_peer

Encoder = tuple[Callable[[str], list[int]], Callable[[list[int]], str]]


def hf_tokenizer(source: Any) -> Encoder:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PeerMissing("the HF tokenizers library is not installed") from None
    if source.format == "gguf":
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise PeerMissing("converting a GGUF vocabulary for HF tokenizers needs transformers") from None
        try:
            hf = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name).backend_tokenizer
        except (ValueError, KeyError, NotImplementedError, TypeError) as e:
            raise PeerMissing(f"transformers cannot convert this GGUF vocabulary: {str(e).splitlines()[0][:160]}",
                              status="unsupported") from None
    else:
        path = source.path / "tokenizer.json"
        if not path.exists():
            raise PeerMissing(f"no tokenizer.json in {source.path}", status="unsupported")
        hf = Tokenizer.from_file(str(path))
    return (lambda text: hf.encode(text, add_special_tokens=False).ids,
            lambda ids: hf.decode(ids, skip_special_tokens=True))


def llama_cpp_tokenizer(source: Any) -> Encoder:
    if source.format != "gguf":
        raise PeerMissing("llama.cpp reads GGUF files only", status="unsupported")
    llama_cpp = import_peer("llama_cpp", "llama-cpp-python")
    try:
        llm = llama_cpp.Llama(model_path=str(source.path), vocab_only=True, verbose=False)
    except ValueError as e:
        raise PeerMissing(f"llama.cpp cannot load this file ({e})", status="unsupported") from None
    return (lambda text: llm.tokenize(text.encode(), add_bos=False, special=False),
            lambda ids: llm.detokenize(ids).decode("utf-8", errors="replace"))


def corejax_encoder(source: Any) -> Encoder:
    from corejax.bench.text import corejax_tokenizer

    tok = corejax_tokenizer(source)
    return (lambda text: tok.encode(text, add_special=False, parse_special=False), tok.decode)


PEERS = {"corejax": corejax_encoder, "hf-tokenizers": hf_tokenizer, "llama.cpp": llama_cpp_tokenizer}


def steps(ctx: Any) -> int:
    return len(ctx.runtimes("tokenizer")) * ctx.reps


def run(ctx: Any) -> None:
    from corejax import hub
    from corejax.bench.text import corpus

    source = hub.resolve(ctx.model, progress=False)
    docs = corpus((256 if ctx.quick else 1024) << 10)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    reference: list[list[int]] | None = None
    for label in ctx.runtimes("tokenizer"):
        try:
            encode, decode = PEERS[label](source)
        except PeerMissing as e:
            ctx.skip("tokenizer", label, str(e), steps=ctx.reps, status=e.status)
            continue
        except Exception as e:  # noqa: BLE001 - a peer's own failure is its row, not the suite's
            if label == "corejax":
                raise
            ctx.peer_raised("tokenizer", label, e, steps=ctx.reps)
            continue
        ids = [encode(d) for d in docs]  # warm-up (and the ids compared below)
        enc, dec = [], []
        for _ in range(ctx.reps):
            t = time.perf_counter()
            for d in docs:
                encode(d)
            enc.append(mb / (time.perf_counter() - t))
            t = time.perf_counter()
            for i in ids:
                decode(i)
            dec.append(mb / (time.perf_counter() - t))
            ctx.step()
        case = f"{len(docs)} docs, {mb:.2f} MB"
        ctx.add("tokenizer", case, label, "encode_mb_s", enc, "MB/s")
        ctx.add("tokenizer", case, label, "decode_mb_s", dec, "MB/s")
        ctx.add("tokenizer", case, label, "tokens_per_kb", [1e3 * sum(map(len, ids)) / (mb * 1e6)], "tokens/KB",
                "lower")
        if reference is None and label == "corejax":
            reference = ids
        elif reference is not None:
            ctx.add("tokenizer", case, label, "agreement", [sum(a == b for a, b in zip(ids, reference)) / len(docs)],
                    "fraction")
        ctx.describe("tokenizer", label, {"calls": "one per document, single-threaded"})
