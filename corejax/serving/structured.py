r"""Structured output: constrain decoding to a JSON schema, a regular expression, a list of choices or a grammar.

The grammar engine is llguidance (Microsoft's, the one behind guidance and vLLM's `guidance` backend): a Rust
Earley parser over a lexer that computes, per step, the set of vocabulary tokens that keep the output a valid
prefix, as a bitmask of ceil(V / 32) int32 words. Chosen over xgrammar, the other well-kept engine: it has no
dependencies (xgrammar needs torch, transformers and triton), reads every format the API promises (JSON schema,
regex, Lark, llama.cpp's GBNF) and compiles a schema about ten times faster. xgrammar's precomputed masks are
faster per step, but llguidance's already cost a few percent of a CPU decode step, and constrained decode runs
within a few percent of unconstrained on both real models (benchmarks/structured.py compares the two engines on
our vocabularies; docs/MEASUREMENTS.md has the figures).

Masks are computed on the host before each step, not overlapped with it: the step needs the previous step's
token, and so does the mask, so an overlap would need the sampler split from the forward pass into a second
program per step; at a few percent of a step (and ~0 on the device's side) that was not worth a program per shape.

How a constrained request runs (corejax/serving/scheduler.py): the worker builds one `GrammarVocab` per model from the
real tokenizer (each token's bytes; control tokens marked so a grammar never produces them by accident), and one
`Matcher` per request. Before each step the scheduler fills the row's mask (and, with speculative decoding, the
mask after each drafted token); the jitted sampler sets the logits of masked tokens to -inf before top-k/top-p/
temperature (corejax/engine/sampling.py), so any sampling setting draws only grammatical tokens; the sampled tokens
advance the matcher. When the grammar is complete the request ends ("stop"); if no token of the vocabulary can
continue it, the request ends with finish_reason "unsatisfiable" (the text so far is a valid prefix).

The options and their validation: corejax/types/constraints.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from corejax.errors import InvalidParameterError
from corejax.types.constraints import Constraint, grammar_engine

FINISH_UNSATISFIABLE = "unsatisfiable"


# ----------------------------------------------------------------------------------------------------
# The worker's side: the vocabulary and one matcher per request


def mask_words(vocab_size: int) -> int:
    """int32 words of one row's token bitmask."""
    return (vocab_size + 31) // 32


class GrammarVocab:
    """llguidance's view of one model's vocabulary: each token id's bytes (V = the model's logit width)."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        from corejax.tokenizer.base import CONTROL, UNKNOWN, UNUSED, USER_DEFINED

        llg = grammar_engine()
        self.vocab_size = vocab_size
        tokens = []
        for i in range(vocab_size):
            if i >= tokenizer.vocab_size:
                tokens.append(b"")
                continue
            piece = tokenizer.token_bytes(i)
            ttype = int(tokenizer.token_types[i])
            if ttype in (CONTROL, UNKNOWN, UNUSED) or (ttype == USER_DEFINED and piece[:1] == b"<"
                                                       and piece[-1:] == b">"):
                piece = b"\xff" + piece  # llguidance's mark for a special token: never matched as text
            tokens.append(piece)

        class _Vocab:  # the duck type llguidance.TokenizerWrapper reads
            eos_token_id = tokenizer.eos_id
            bos_token_id = tokenizer.bos_id
            special_token_ids: list[int] = []

            def __call__(self, text: bytes | str) -> list[int]:
                if isinstance(text, bytes):
                    text = text.decode("utf-8", "replace")
                return tokenizer.encode(text, add_special=False, parse_special=False)

        vocab = _Vocab()
        vocab.tokens = tokens
        self.eos_ids = sorted(tokenizer.eos_ids)
        self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(vocab), n_vocab=vocab_size, eos_token=self.eos_ids)
        self.executor = llg.LLExecutor()

    def matcher(self, constraint: Constraint) -> Matcher:
        return Matcher(self, constraint)

    def fill(self, rows: list[tuple[Matcher, int, list[int]]], out: np.ndarray) -> None:
        """Writes each matcher's mask into out[index] ([N, W] int32, C order) and, for its drafted tokens,
        the masks after each of them into out[index + 1 ...]; the matchers end where they started. Runs the
        rows on llguidance's thread pool."""
        if not rows:
            return
        if not out.flags["C_CONTIGUOUS"] or out.dtype != np.int32:
            raise ValueError("the mask array must be C-contiguous int32")
        n, w = out.shape
        plain = [(m.llm, i) for m, i, d in rows if not d]
        drafted = [(m.llm, i, d) for m, i, d in rows if d]
        if plain:
            self.executor.unsafe_compute_mask_ptr(plain, out.ctypes.data, w * 4, n)
        if drafted:
            self.executor.unsafe_compute_mask_ptr_with_draft_token(drafted, out.ctypes.data, w * 4, n)


class Matcher:
    """One request's grammar state."""

    def __init__(self, vocab: GrammarVocab, constraint: Constraint):
        llg = grammar_engine()
        self.vocab = vocab
        self.llm = llg.LLMatcher(vocab.tokenizer, constraint.grammar(), log_level=0)
        if self.llm.is_error():
            raise InvalidParameterError(f"invalid {constraint.kind.replace('_', ' ')}: {self.llm.get_error()}")

    def fork(self) -> Matcher:
        """An independent copy of this grammar state (a draft model drafts under it without moving this one)."""
        twin = object.__new__(Matcher)
        twin.vocab, twin.llm = self.vocab, self.llm.deep_copy()
        return twin

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens` (drafts) the grammar accepts in a row, without consuming them."""
        return self.llm.validate_tokens(tokens) if tokens else 0

    def consume(self, token: int) -> None:
        if not self.llm.consume_token(token):
            raise InvalidParameterError(f"token {token} violates the grammar: {self.llm.get_error()}")

    @property
    def failed(self) -> bool:
        """No token of the vocabulary continues the grammar (llguidance's error state)."""
        return self.llm.is_error()

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more (an end-of-sequence token included)."""
        return self.llm.is_stopped()


def trim_drafts(reqs: list[Any], drafts: dict[int, list[int]]) -> None:
    """Cuts each constrained request's drafts at the first token its grammar rejects: such a draft could never
    be accepted (its position's sample is drawn under the mask), so it is not worth verifying."""
    for req in reqs:
        d = drafts.get(req.rid)
        if d and req.matcher is not None:
            drafts[req.rid] = d[:req.matcher.valid_prefix(d)]


def step_masks(reqs: list[Any], drafts: list[list[int]], rows: Sequence[int], b: int, t: int,
               vocab_size: int) -> np.ndarray | None:
    """A step's token bitmasks [b, t, W] for requests at batch rows `rows`, or None when none is constrained:
    each constrained row's mask at position 0 and after each of its drafts (their time is added to the
    request's times.mask_s); other rows allow everything. A request whose grammar allows no token at all gets
    finish_reason FINISH_UNSATISFIABLE (the scheduler ends it after the step)."""
    constrained = [(req, d, i) for req, d, i in zip(reqs, drafts, rows) if req.matcher is not None]
    if not constrained:
        return None
    started = time.perf_counter()
    masks = np.full((b * t, mask_words(vocab_size)), -1, np.int32)
    for _, _, i in constrained:
        masks[i * t:(i + 1) * t] = 0
    constrained[0][0].matcher.vocab.fill([(req.matcher, i * t, d) for req, d, i in constrained], masks)
    share = (time.perf_counter() - started) / len(constrained)
    for req, _, i in constrained:
        req.times.mask_s += share
        if req.matcher.failed or not masks[i * t].any():
            req.finish_reason = FINISH_UNSATISFIABLE
    return masks.reshape(b, t, -1)
