"""Encoder latency: `python benchmarks/embedding.py [--reps R] [--batches B]`.

In one run, side by side on all-MiniLM-L6-v2: corejax (sandboxed Session, and in-process), ONNX Runtime (the
model exported with torch.onnx, mean pooling + L2 in numpy) and sentence-transformers (torch):
single-sentence embedding P50/P95 latency, batch-32 throughput (sentences/s), and single-sentence
classification P95 (corejax: a linear head over the embedding; the others: the same head in numpy).
Prints a table and writes JSON (default benchmarks/out/embedding.json). Missing baselines are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import corejax
from corejax import hub

SENTENCES = [
    "A man is eating food.", "The new movie is awesome, I loved every minute of it.",
    "Stocks fell sharply on Tuesday after the central bank raised interest rates again.",
    "How do I reset my password?", "Das ist ein kurzer deutscher Satz.", "🤖 robots are taking over!",
    "The quick brown fox jumps over the lazy dog.", "Climate change affects agriculture in many regions.",
]


def _percentiles(times: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times)
    return {"p50_ms": statistics.median(ms), "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))]}


def _latency(fn, reps: int) -> dict:
    for s in SENTENCES[:3]:
        fn([s])  # warm-up: compile / first-call costs are not latency
    times = []
    for i in range(reps):
        s = SENTENCES[i % len(SENTENCES)]
        t = time.perf_counter()
        fn([s])
        times.append(time.perf_counter() - t)
    return _percentiles(times)


def _throughput(fn, batches: int) -> float:
    batch = [SENTENCES[i % len(SENTENCES)] + f" ({i})" for i in range(32)]
    fn(batch)
    t = time.perf_counter()
    for _ in range(batches):
        fn(batch)
    return 32 * batches / (time.perf_counter() - t)


def onnx_embedder(folder: Path):
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    path = Path(tempfile.mkdtemp()) / "minilm.onnx"
    ids = tok(["hello world"], return_tensors="pt")
    class Wrapped(torch.nn.Module):  # keyword arguments: BertModel.forward's positional order changes
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state

    torch.onnx.export(Wrapped().eval(), (ids["input_ids"], ids["attention_mask"], ids["token_type_ids"]), str(path),
                      input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["hidden"],
                      dynamic_axes={k: {0: "b", 1: "t"} for k in ("input_ids", "attention_mask", "token_type_ids")},
                      opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def embed(texts):
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="np")
        hidden = sess.run(None, {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask",
                                                                       "token_type_ids")})[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)

    return embed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/out/embedding.json")
    args = ap.parse_args()
    folder = hub.resolve("all-minilm-l6-v2", progress=False).path
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((384, 4)).astype(np.float32), np.zeros(4, np.float32)
    labels = ["a", "b", "c", "d"]
    runners = {}
    for name, sandbox in (("corejax (sandboxed)", True), ("corejax (in-process)", False)):
        s = corejax.Session("all-minilm-l6-v2", sandbox=sandbox, progress=False)
        runners[name] = (s.embed, lambda texts, s=s: s.classify(texts, labels=labels, head=(w, b)))
    try:
        onnx = onnx_embedder(folder)
        runners["onnxruntime"] = (onnx, lambda texts: onnx(texts) @ w + b)
    except ImportError as e:
        print(f"skipping ONNX Runtime: {e}")
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(folder), device="cpu")
        st_embed = lambda texts: st.encode(texts, convert_to_numpy=True)
        runners["sentence-transformers"] = (st_embed, lambda texts: st_embed(texts) @ w + b)
    except ImportError as e:
        print(f"skipping sentence-transformers: {e}")
    results = {}
    for name, (embed, classify) in runners.items():
        results[name] = {"embed_1": _latency(embed, args.reps), "batch32_sent_per_s": _throughput(embed, args.batches),
                         "classify_1": _latency(classify, args.reps)}
    print(f"{'runtime':24} {'embed P50':>10} {'embed P95':>10} {'batch-32 sent/s':>16} {'classify P95':>13}")
    for name, r in results.items():
        print(f"{name:24} {r['embed_1']['p50_ms']:9.2f}ms {r['embed_1']['p95_ms']:9.2f}ms "
              f"{r['batch32_sent_per_s']:16.1f} {r['classify_1']['p95_ms']:11.2f}ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
