"""Speculative decoding suite: decode tokens/s with and without speculation, and the acceptance rate, per
method, on two workloads through a sandboxed corejax.Session:

- "repeat": the output repeats the input (rewriting a list, copying code, quoting a passage) — where prompt
  n-gram lookup shines;
- "free": free generation (stories), where drafts rarely match and speculation must cost little.

Methods: plain decoding, "ngram" (prompt lookup), "draft" (the same model at int8 as its own draft; with the
models the package index carries there is no smaller sibling sharing a tokenizer). Greedy, so every method
produces the same text and only the speed differs. Decode tokens/s is the Timings figure (tokens after the
first over the time after the first), averaged over the workload's prompts; speedup = method / plain.
"""

from __future__ import annotations

from typing import Any

WORKLOADS = {
    "repeat": [
        "Rewrite the list with numbers.\nApples, pears, plums, cherries, grapes, lemons, limes, melons.\n"
        "1. Apples\n2. Pears\n3. Plums\n4. Cherries\n5. Grapes\n6. Lemons\n7. Limes\n8. Melons\n\n"
        "Again, the same list:\n1. Apples\n2.",
        "def area(width, height):\n    \"\"\"Area of a rectangle.\"\"\"\n    return width * height\n\n\n"
        "def perimeter(width, height):\n    \"\"\"Perimeter of a rectangle.\"\"\"\n    return 2 * (width + height)\n"
        "\n\n# The same two functions, copied unchanged:\n\ndef area(width, height):\n",
        "Quote: \"The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil "
        "and a notebook.\"\nRepeat the quote exactly.\nQuote: \"The lighthouse keeper",
    ],
    "free": [
        "Once upon a time, in a kingdom far away,",
        "The most surprising thing about the deep ocean is",
    ],
}
METHODS: dict[str, dict | None] = {
    "plain": None,
    "ngram": {"method": "ngram", "k": 7},
    "draft-int8": {"method": "draft", "draft_weights": "int8", "k": 4},
}


def steps(ctx: Any) -> int:
    return len(WORKLOADS) * len(_methods(ctx)) * (ctx.reps + 1)


def _methods(ctx: Any) -> dict[str, dict | None]:
    # The int8 draft decodes slower than the f32 target on XLA:CPU today (issue 4), so --quick leaves it out.
    return {k: v for k, v in METHODS.items() if not (ctx.quick and k == "draft-int8")}


def _pass(session: Any, prompts: list[str], spec: dict | None, tokens: int) -> tuple[float, int, int, list]:
    rates, drafted, accepted, texts = [], 0, 0, []
    for prompt in prompts:
        r = session.generate(prompt, temperature=0, max_tokens=tokens, ignore_eos=True, speculative=spec)
        rates.append(r.timings.decode_tokens_per_s)
        drafted += r.timings.draft_tokens
        accepted += r.timings.accepted_draft_tokens
        texts.append(r.tokens)
    return sum(rates) / len(rates), drafted, accepted, texts


def run(ctx: Any) -> None:
    import corejax

    tokens = ctx.decode_tokens
    with corejax.Session(ctx.model, progress=False, keep_alive=0) as session:
        ctx.describe("speculative", "corejax", {"sandbox": True, "sampling": "greedy",
                                                "methods": {k: v for k, v in _methods(ctx).items()}})
        for workload, prompts in WORKLOADS.items():
            plain_rate = None
            reference = None
            for name, spec in _methods(ctx).items():
                _pass(session, prompts, spec, tokens)  # warm-up: compiles the verify shapes
                ctx.step()
                rates, rate_acc = [], []
                for _ in range(ctx.reps):
                    rate, drafted, accepted, texts = _pass(session, prompts, spec, tokens)
                    if reference is None:
                        reference = texts
                    elif texts != reference:
                        raise AssertionError(f"speculative {name} changed the greedy text on {workload}")
                    rates.append(rate)
                    if drafted:
                        rate_acc.append(accepted / drafted)
                    ctx.step()
                case = f"{workload}/{name}"
                ctx.add("speculative", case, "corejax", "decode_tok_s", rates, "tok/s")
                if spec is None:
                    plain_rate = sum(rates) / len(rates)
                else:
                    ctx.add("speculative", case, "corejax", "speedup_vs_plain", [r / plain_rate for r in rates], "x")
                    if rate_acc:
                        ctx.add("speculative", case, "corejax", "acceptance_rate", rate_acc, "ratio")
