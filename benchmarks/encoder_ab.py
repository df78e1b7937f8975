"""One runtime's all-MiniLM-L6-v2 figures as a JSON line, for A/B runs of two checkouts on a shared machine:
single-sentence latency over 300 calls (P50, P95, min), batch-32 sentences/s (median and best of 10 batches),
classification P95 (a 4-label head over the embeddings). Alternate the checkouts and ONNX Runtime:

    PYTHONPATH=/path/to/main python benchmarks/encoder_ab.py corejax
    PYTHONPATH=$PWD python benchmarks/encoder_ab.py corejax        # or corejax-sandbox
    PYTHONPATH=$PWD python benchmarks/encoder_ab.py ort            # intra-op threads 2
"""

import json
import os
import sys
import time

import numpy as np

from corejax.bench.embedding import _percentile, latency_ms
from corejax.bench.text import SENTENCES

MODEL = "all-minilm-l6-v2"


def runtime(which: str):
    """(embed, classify) of corejax (in-process or sandboxed) or ONNX Runtime on the exported model."""
    w = np.random.default_rng(0).standard_normal((384, 4)).astype(np.float32)
    if which == "ort":
        from corejax import hub
        from corejax.bench.embedding import onnx_embedder

        embed = onnx_embedder(hub.resolve(MODEL, progress=False).path, 2)
        return embed, lambda texts: embed(texts) @ w
    import corejax

    s = corejax.Session(MODEL, sandbox=which == "corejax-sandbox", progress=False, keep_alive=0)
    return s.embed, lambda texts: s.classify(texts, labels=list("abcd"), head=(w, np.zeros(4, np.float32)))


def main(which: str) -> None:
    embed, classify = runtime(which)
    lat = latency_ms(embed, 300)
    batch = [SENTENCES[i % len(SENTENCES)] + f" ({i})" for i in range(32)]
    embed(batch)
    rates = []
    for _ in range(10):
        t = time.perf_counter()
        embed(batch)
        rates.append(32 / (time.perf_counter() - t))
    cls = latency_ms(classify, 200)
    print(json.dumps({"who": which, "p50": _percentile(lat, 0.5), "p95": _percentile(lat, 0.95), "min": min(lat),
                      "b32_med": float(np.median(rates)), "b32_best": max(rates), "cls95": _percentile(cls, 0.95),
                      "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "corejax")
