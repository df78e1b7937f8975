"""corejax.stream: print the text piece by piece while the model generates it.

    python examples/stream.py
    python examples/stream.py --model gemma3-270m "A short poem about the sea:"

Pieces never split a UTF-8 character and never contain (part of) a stop string.
"""

import argparse
import sys
import time

import corejax

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("prompt", nargs="?", default="Here is a short story about a robot who learns to paint:")
parser.add_argument("--model", default=None, help=f"registry name or .gguf path (default: {corejax.DEFAULT_MODEL})")
parser.add_argument("--max-tokens", type=int, default=40)
args = parser.parse_args()

print(args.prompt, end="", flush=True)
pieces = 0
start = time.perf_counter()
# corejax.stream returns an iterator; each item is a str, printed as soon as it is produced.
for piece in corejax.stream(args.prompt, model=args.model, max_tokens=args.max_tokens, temperature=0.7, seed=42):
    print(piece, end="", flush=True)
    pieces += 1
print()
print(f"[{pieces} pieces streamed in {time.perf_counter() - start:.1f}s, including the first load]", file=sys.stderr)
