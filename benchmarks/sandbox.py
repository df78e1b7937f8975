"""What the sandbox costs: the empty-request round trip and decode tokens/s, sandboxed vs in-process, plus
the protocol codec's µs per message. A shortcut for `corejax bench --suite ipc micro` (see
corejax/bench/ipc.py and micro.py), writing benchmarks/out/sandbox.json and its plots unless --json is given:

    python benchmarks/sandbox.py [--model NAME] [--decode-tokens 64] [--reps 5] ...
"""

from corejax.bench.command import run_script

if __name__ == "__main__":
    run_script(["ipc", "micro"], __file__)
