"""Sampling parameters (corejax.SamplingParams): seeds, top-k / top-p / min-p, penalties, stop strings, logprobs.

    python examples/sampling.py
    python examples/sampling.py --model gemma3-270m

Every keyword below works with corejax.generate, corejax.stream, Session.generate and Session.stream.
Defaults: temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, no penalties, max_tokens=256.
"""

import argparse

import corejax

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help=f"registry name or .gguf path (default: {corejax.DEFAULT_MODEL})")
args = parser.parse_args()

session = corejax.Session(args.model, progress=False)
prompt = "My favourite animal is"
N = 16  # tokens per request: short, so the example stays quick on a laptop CPU

print("== seeds: the same seed gives the same text; no seed gives a fresh draw each time")
a = session.generate(prompt, max_tokens=N, temperature=1.0, seed=1234).text
b = session.generate(prompt, max_tokens=N, temperature=1.0, seed=1234).text
c = session.generate(prompt, max_tokens=N, temperature=1.0, seed=99).text
print(f"seed=1234: {a!r}\nseed=1234: {b!r}\nseed=99:   {c!r}")
print(f"seed 1234 reproduced: {a == b}")

print("\n== truncation: which tokens may be sampled at all")
for label, kw in [
    ("greedy (temperature=0)", dict(temperature=0)),
    ("top_k=5", dict(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0)),
    ("top_p=0.5", dict(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0)),
    ("min_p=0.2", dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)),
    ("no truncation, temperature=1.5", dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)),
]:
    text = session.generate(prompt, max_tokens=N, seed=2, **kw).text
    print(f"{label:<32} {text!r}")

print("\n== penalties: discourage tokens that already appeared")
listy = "Fruits: apple, banana, apple, banana,"
for label, kw in [
    ("none", {}),
    ("repetition_penalty=1.3", dict(repetition_penalty=1.3)),
    ("presence_penalty=1.0", dict(presence_penalty=1.0)),
    ("frequency_penalty=1.0", dict(frequency_penalty=1.0)),
]:
    text = session.generate(listy, max_tokens=N, temperature=0, **kw).text
    print(f"{label:<24} {text!r}")

print("\n== stop strings: generation ends before the stop string, which is not included")
r = session.generate("Count: one, two, three,", max_tokens=30, temperature=0, stop=["six"])
print(f"stop=['six']: {r.text!r}  finish_reason={r.finish_reason}")
r = session.generate("Count: one, two, three,", max_tokens=8, temperature=0)
print(f"no stop:      {r.text!r}  finish_reason={r.finish_reason}")

print("\n== logprobs=3: the chosen token's log-probability and the 3 most likely alternatives")
r = session.generate("The capital of Italy is", max_tokens=6, temperature=0, logprobs=3)
print(f"{'token':<12} {'logprob':>8}   top alternatives")
for lp in r.logprobs:
    alts = ", ".join(f"{session.detokenize([tid])!r} {p:.2f}" for tid, p in lp.top)
    print(f"{lp.text!r:<12} {lp.logprob:>8.3f}   {alts}")

# Bad values are rejected before anything runs:
try:
    session.generate(prompt, top_p=1.5)
except corejax.InvalidParameterError as e:
    print(f"\nInvalidParameterError: {e}")
