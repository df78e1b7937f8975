"""Prefill and decode tokens/s, time to first token, memory and roofline fractions: corejax beside llama.cpp
and HF transformers on the same GGUF file. A shortcut for `corejax bench --suite generation` (see
corejax/bench/generation.py for what is measured and how), writing benchmarks/out/generation.json and its
plot unless --json is given:

    python benchmarks/generation.py [--model gemma3-270m] [--reps 3] [--prompt-lengths 32 128 512] [--quick] ...
"""

from corejax.bench.command import run_script

if __name__ == "__main__":
    run_script(["generation"], __file__)
