"""Encoder latency and throughput: corejax (sandboxed and in-process) beside ONNX Runtime and
sentence-transformers on all-MiniLM-L6-v2. A shortcut for `corejax bench --suite embedding` (see
corejax/bench/embedding.py), writing benchmarks/out/embedding.json and its plot unless --json is given:

    python benchmarks/embedding.py [--reps 3] [--quick] [--embedding-model NAME] ...
"""

from corejax.bench.command import run_script

if __name__ == "__main__":
    run_script(["embedding"], __file__)
