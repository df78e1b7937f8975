"""The texts the suites feed every runtime: prompts of a given token length, sentences, a tokenizer corpus."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil "
             "and a notebook in which he recorded the weather and the ships that passed. ")

SENTENCES = [
    "A man is eating food.", "The new movie is awesome, I loved every minute of it.",
    "Stocks fell sharply on Tuesday after the central bank raised interest rates again.",
    "How do I reset my password?", "Das ist ein kurzer deutscher Satz.", "🤖 robots are taking over!",
    "The quick brown fox jumps over the lazy dog.", "Climate change affects agriculture in many regions.",
]

# Tokenizer corpus: prose, code, numbers and several scripts, so pre-tokenizer regexes and byte fallback both
# run. Numbered copies keep the texts distinct (a BPE word cache cannot serve every lookup).
_CORPUS_PARTS = [
    PARAGRAPH,
    "def fibonacci(n: int) -> int:\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n\n",
    "Invoice #{i}: 3 × 12.50 EUR = 37.50 EUR, due 2026-{m:02d}-15; ref. ID-{i:06d}-XZ.\n",
    "Le phare se dressait au bout de la jetée ; les mouettes criaient au-dessus des vagues. ",
    "Der Leuchtturmwärter stieg jeden Abend die Wendeltreppe hinauf. ",
    "灯塔看守人每天傍晚爬上螺旋楼梯。 Маяк стоял на краю скалы. 🌊🚢 ",
    "    if (x->refcount-- == 0) {{ free(x); }}  // TODO: {i}\n",
]


def corpus(target_bytes: int) -> list[str]:
    """Distinct documents of about 1 KiB each, `target_bytes` of UTF-8 in all."""
    docs, size, i = [], 0, 0
    while size < target_bytes:
        doc = "".join(part.format(i=i * 7 + k, m=(i + k) % 12 + 1) for k, part in enumerate(_CORPUS_PARTS * 2))
        docs.append(doc)
        size += len(doc.encode())
        i += 1
    return docs


def prompt_of(count: Callable[[str], int], n_tokens: int) -> str:
    """The longest whole-word prefix of repeated PARAGRAPHs that `count` says is at most n_tokens tokens."""
    words = (PARAGRAPH * (n_tokens // 20 + 2)).split(" ")
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid])) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def corejax_tokenizer(source: Any):
    """corejax's own Tokenizer for a resolved model, built on the host from the file's tokenizer data alone
    (no weights, no JAX): the same object the worker builds."""
    if source.format == "gguf":
        from corejax.loading.gguf import read_gguf
        from corejax.tokenizer import tokenizer_from_gguf_metadata

        with read_gguf(source.path) as f:
            return tokenizer_from_gguf_metadata(f.metadata)
    from corejax.tokenizer import tokenizer_from_files

    return tokenizer_from_files(source.path)
