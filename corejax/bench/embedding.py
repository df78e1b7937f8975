"""Embedding suite: single-sentence embedding P50/P95, batch-32 throughput and classification P95 on an
encoder (default all-MiniLM-L6-v2) — corejax (sandboxed and in-process) beside ONNX Runtime (the model
exported with torch.onnx, mean pooling + L2 in numpy) and sentence-transformers (torch), in this process.

Classification: corejax applies a linear head over its embeddings (`classify(head=...)`); the peers apply
the same head in numpy. Each repetition measures `requests` single-sentence calls (its P50 and P95 are one
sample each) and `batches` batch-32 calls, after a warm-up that compiles or caches the shapes.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from corejax.bench.child import PeerMissing
from corejax.bench.text import SENTENCES

Fn = Callable[[list[str]], Any]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_ms(fn: Fn, requests: int) -> list[float]:
    """Milliseconds of each of `requests` single-sentence calls, after a warm-up of three."""
    for s in SENTENCES[:3]:
        fn([s])
    times = []
    for i in range(requests):
        t = time.perf_counter()
        fn([SENTENCES[i % len(SENTENCES)]])
        times.append((time.perf_counter() - t) * 1e3)
    return times


def throughput(fn: Fn, batches: int, size: int = 32) -> float:
    """Sentences per second over `batches` calls of `size` distinct sentences."""
    batch = [SENTENCES[i % len(SENTENCES)] + f" ({i})" for i in range(size)]
    fn(batch)
    t = time.perf_counter()
    for _ in range(batches):
        fn(batch)
    return size * batches / (time.perf_counter() - t)


def _quiet_transformers() -> None:
    """No per-load progress bars or notices from transformers across the bench's own progress bar."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def onnx_embedder(folder: Path, threads: int | None = None) -> Fn:
    """ONNX Runtime on the exported encoder, intra-op threads = `threads` (the bench's --threads: corejax's cores)."""
    try:
        import onnx  # noqa: F401 - torch.onnx.export writes through it
        import onnxruntime as ort
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise PeerMissing(f"ONNX Runtime peer needs onnxruntime, onnx, torch and transformers ({e.name} missing; "
                          "pip install 'corejax[bench]')") from None
    _quiet_transformers()
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    path = Path(tempfile.mkdtemp(prefix="corejax-bench-")) / "encoder.onnx"
    ids = tok(["hello world"], return_tensors="pt")
    names = ("input_ids", "attention_mask", "token_type_ids")

    class Wrapped(torch.nn.Module):  # keyword arguments: BertModel.forward's positional order changes
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    with warnings.catch_warnings():  # the tracer's notes on shapes held constant: they are dynamic_axes here
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapped().eval(), tuple(ids[k] for k in names), str(path), input_names=list(names),
                          output_names=["hidden"], dynamic_axes={k: {0: "b", 1: "t"} for k in names},
                          opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def embed(texts: list[str]) -> np.ndarray:
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
        hidden = sess.run(None, {k: enc[k].astype(np.int64) for k in names})[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)

    return embed


def sentence_transformers_embedder(folder: Path) -> Fn:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise PeerMissing("sentence-transformers is not installed (pip install 'corejax[bench]')") from None
    _quiet_transformers()
    st = SentenceTransformer(str(folder), device="cpu")
    return lambda texts: st.encode(texts, convert_to_numpy=True)


def _head(embed: Fn, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """The same random linear head (W [dim, labels], b [labels]) for every runtime."""
    dim = np.asarray(embed([SENTENCES[0]])).shape[-1]
    w = np.random.default_rng(0).standard_normal((dim, n_labels)).astype(np.float32)
    return w, np.zeros(n_labels, np.float32)


def steps(ctx: Any) -> int:
    return len(ctx.runtimes("embedding")) * ctx.reps


def _runtime(ctx: Any, label: str, source: Any, labels: list[str], sessions: list) -> tuple[Fn, Fn] | None:
    """(embed, classify) of one runtime, or None when it is skipped (recorded)."""
    import corejax

    if label.startswith("corejax"):
        s = corejax.Session(ctx.embedding_model, sandbox=label == "corejax", progress=False, keep_alive=0)
        sessions.append(s)
        w, b = _head(s.embed, len(labels))
        ctx.describe("embedding", label, {"sandbox": label == "corejax", "weights": s.info()["weights"]})
        return s.embed, lambda texts: s.classify(texts, labels=labels, head=(w, b))
    if source.format != "hf":
        ctx.skip("embedding", label, "needs an HF folder model", steps=ctx.reps, status="unsupported")
        return None
    try:
        embed = (onnx_embedder(source.path, ctx.threads) if label == "onnxruntime" else
                 sentence_transformers_embedder(source.path))
        w, b = _head(embed, len(labels))
    except PeerMissing as e:
        ctx.skip("embedding", label, str(e), steps=ctx.reps, status=e.status)
        return None
    except Exception as e:  # noqa: BLE001 - a peer's own failure is its row, not the suite's
        ctx.peer_raised("embedding", label, e, steps=ctx.reps)
        return None
    ctx.describe("embedding", label, {"head": "numpy matmul over the embeddings"} |
                 ({"intra_op_threads": ctx.threads} if label == "onnxruntime" else {}))
    return embed, lambda texts: embed(texts) @ w + b


def run(ctx: Any) -> None:
    """Every runtime is loaded first; each repetition then measures them in turn (the order rotating), so a
    drift of the shared machine's speed over minutes (tens of percent; docs/MEASUREMENTS.md) lands on all of
    them alike."""
    from corejax import hub

    source = hub.resolve(ctx.embedding_model, progress=False)
    labels = ["a", "b", "c", "d"]
    requests, batches = (30, 3) if ctx.quick else (100, 10)
    sessions: list = []
    try:
        runners = {}
        for label in ctx.runtimes("embedding"):
            if (r := _runtime(ctx, label, source, labels, sessions)) is not None:
                runners[label] = r
        samples: dict[str, dict[str, list[float]]] = {
            label: {"p50": [], "p95": [], "sent_s": [], "cls95": []} for label in runners}
        order = list(runners)
        for rep in range(ctx.reps):
            shift = rep % max(1, len(order))
            for label in order[shift:] + order[:shift]:
                time.sleep(0.2)  # the previous runtime's spinning pool threads (ONNX Runtime, torch) park
                embed, classify = runners[label]
                got = samples[label]
                lat = latency_ms(embed, requests)
                got["p50"].append(_percentile(lat, 0.5))
                got["p95"].append(_percentile(lat, 0.95))
                got["sent_s"].append(throughput(embed, batches))
                got["cls95"].append(_percentile(latency_ms(classify, requests), 0.95))
                ctx.step()
        for label, got in samples.items():
            ctx.add("embedding", "embed 1 sentence", label, "p50_ms", got["p50"], "ms", "lower")
            ctx.add("embedding", "embed 1 sentence", label, "p95_ms", got["p95"], "ms", "lower")
            ctx.add("embedding", "embed batch 32", label, "sentences_per_s", got["sent_s"], "sentences/s")
            ctx.add("embedding", "classify 1 sentence", label, "p95_ms", got["cls95"], "ms", "lower")
    finally:
        for s in sessions:
            s.close()
