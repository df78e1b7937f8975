"""Many streams on one Session, and speculative decoding.

    python examples/many_streams.py
    python examples/many_streams.py --model gemma3-270m

Requests from several threads (or asyncio tasks) run together: the worker batches every running sequence
into one decode step, so four streams cost little more than one. Speculative decoding ("ngram": draft
tokens by looking up the context's last words earlier in the prompt) speeds up output that repeats its
input, and never changes the text.
"""

import argparse
import threading
import time

import corejax

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help=f"registry name or .gguf path (default: {corejax.DEFAULT_MODEL})")
args = parser.parse_args()

topics = ["the sea", "a mountain village", "a clockmaker", "the first snow"]

with corejax.Session(args.model, progress=False) as session:
    results = {}

    def write(topic: str) -> None:
        results[topic] = session.generate(f"A short poem about {topic}:\n", max_tokens=48, temperature=0)

    def burst() -> float:
        start = time.perf_counter()
        threads = [threading.Thread(target=write, args=(t,)) for t in topics]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start

    burst()  # the first burst compiles the batch shapes (cached on disk for the next run); time the second
    elapsed = burst()
    tokens = sum(len(r.tokens) for r in results.values())
    print(f"{len(topics)} concurrent streams: {tokens} tokens in {elapsed:.1f}s ({tokens / elapsed:.0f} tok/s in all)")
    for topic in topics:
        print(f"  {topic}: {results[topic].text.strip()[:60]!r}...")

    listing = ("Copy the list.\nApples, pears, plums, cherries, grapes, lemons.\n"
               "1. Apples\n2. Pears\n3. Plums\n4. Cherries\n5. Grapes\n6. Lemons\n\nAgain:\n1. Apples\n2.")
    for _ in range(2):  # again: the first run compiles the verify step
        plain = session.generate(listing, max_tokens=40, temperature=0)
        fast = session.generate(listing, max_tokens=40, temperature=0, speculative={"method": "ngram"})
    t = fast.timings
    print(f"speculative ngram: same text: {fast.text == plain.text}; "
          f"{t.accepted_draft_tokens} of {t.draft_tokens} drafted tokens accepted; "
          f"decode {plain.timings.decode_tokens_per_s:.0f} -> {t.decode_tokens_per_s:.0f} tok/s")
