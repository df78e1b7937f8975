"""Run by tests/test_distributed.py: one process of a two-process cluster on loopback. Process 0 generates
greedily and prints its tokens and sandbox report as one JSON line; process 1 follows until process 0 closes."""

from __future__ import annotations

import json
import sys

from corejax import Session
from corejax.types.cluster import Cluster

PROMPTS = ("The capital of France is", "def fibonacci(n):")


def main(path: str, port: int, process_id: int) -> None:
    session = Session(path, cluster=Cluster(f"127.0.0.1:{port}", 2, process_id, timeout_s=120), progress=False)
    if process_id:
        session.follow()
        return
    out = {"prompts": PROMPTS, "tokens": [], "ngram": None, "layers": session.sandbox_report()["layers"]}
    for prompt in PROMPTS:
        out["tokens"].append(list(session.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True).tokens))
    out["ngram"] = list(session.generate(PROMPTS[1], max_tokens=12, temperature=0, ignore_eos=True,
                                         speculative={"method": "ngram"}).tokens)
    session.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
