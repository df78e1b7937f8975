"""What a request returns: the result object, its timings and per-token logprobs (plain data, no JAX)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: int
    text: str
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the most likely alternatives, best first
    top_text: tuple[str, ...] = ()  # the text of each alternative in `top`


@dataclasses.dataclass(frozen=True)
class Timings:
    load_s: float  # loading the model (once per session; repeated here for convenience)
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV was reused from an earlier request (prefix cache)
    generated_tokens: int
    time_to_first_token_s: float  # prefill + first sample, including any compile on a new shape
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # tokens after the first, over the time after the first
    total_s: float
    draft_tokens: int = 0  # speculative decoding: tokens proposed ...
    accepted_draft_tokens: int = 0  # ... and accepted by the model (acceptance rate = accepted / drafted)
    preemptions: int = 0  # times the scheduler preempted this request to free KV pages (recomputed, same text)
    mask_s: float = 0.0  # structured output: host time computing this request's token masks


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    text: str
    tokens: tuple[int, ...]  # generated ids (an end-of-sequence token included when one ended it)
    finish_reason: str  # "stop" (end-of-sequence token, stop string, or a structured-output grammar complete),
    # "length" (max_tokens or context), "content_filter" (the output filter matched; the text ends before the
    # match) or "unsatisfiable" (structured output: no token of the vocabulary continues the grammar)
    prompt_tokens: tuple[int, ...]
    timings: Timings
    logprobs: tuple[TokenLogprob, ...] | None = None
    # Chat requests (corejax/tools/): the calls the model made, in OpenAI's shape ({"id", "type": "function",
    # "function": {"name", "arguments": JSON text}}; finish_reason is then "tool_calls", and text holds only the
    # content around them), and a thinking model's reasoning (<think>...</think>), apart from text.
    tool_calls: tuple[dict, ...] = ()
    reasoning_content: str | None = None

    def __str__(self) -> str:
        return self.text


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One streamed piece. The last chunk of a request has `result` set (its text is then empty)."""

    text: str
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    result: GenerationResult | None = None
    tool_calls: tuple[dict, ...] = ()  # calls complete in this piece, each with its "index" in the reply
    reasoning: str = ""  # reasoning text of this piece (a thinking model), apart from `text`


@dataclasses.dataclass(frozen=True)
class Classification:
    """One text's classification: the best label, its score, and every label's score (in label order).

    Scores are softmax probabilities (they sum to 1), or independent sigmoids for a multi-label head."""

    label: str
    score: float
    scores: dict[str, float]
