"""corejax.Session: load a model once, run many requests, and read the full GenerationResult.

    python examples/session.py
    python examples/session.py --model gemma3-270m

corejax.generate keeps a Session per model behind the scenes; use one yourself when you want more than the
text: the generated token ids, why generation stopped, timings, logprobs, or tokenize/detokenize.
"""

import argparse

import corejax

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help=f"registry name or .gguf path (default: {corejax.DEFAULT_MODEL})")
args = parser.parse_args()

prompts = [
    "The largest planet in the solar system is",
    "Water boils at a temperature of",
    "A good name for a pet goldfish is",
]

# `with` closes the session (and frees the model) at the end; progress=False hides the loading bars.
with corejax.Session(args.model, progress=False) as session:
    info = session.info()
    print(f"model: {info['name']} ({info['architecture']}, {info['parameters'] / 1e6:.0f}M parameters), "
          f"loaded in {info['load_seconds']:.1f}s")

    for prompt in prompts:
        result = session.generate(prompt, max_tokens=24, temperature=0, stop=["\n"])
        t = result.timings
        print(f"\nprompt:        {prompt!r}")
        print(f"text:          {result.text!r}")  # str(result) is the text as well
        print(f"tokens:        {len(result.tokens)} ids, first ones {list(result.tokens[:5])}")
        print(f"finish_reason: {result.finish_reason}")  # "stop" (EOS or stop string) or "length" (max_tokens)
        print(f"timings:       {t.prompt_tokens} prompt tokens, {t.generated_tokens} generated, "
              f"first token {t.time_to_first_token_s:.2f}s, decode {t.decode_tokens_per_s:.1f} tok/s, "
              f"total {t.total_s:.2f}s")

    # The session's tokenizer round-trips text <-> token ids.
    ids = session.tokenize("Hello, corejax!", add_special=False)
    print(f"\ntokenize('Hello, corejax!') = {ids} -> {session.detokenize(ids)!r}")
