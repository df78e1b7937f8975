"""Zero-shot classification with a generative model: each label is scored by the log-likelihood of its tokens
as the answer to a prompt (chat template when the model has one), and the scores are a softmax over labels."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from corejax.serving.batch import MIN_PREFILL_BUCKET, bucket, padded
from corejax.errors import ContextLengthError, InvalidParameterError

_PRIORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # runner -> {(labels, template): prior [L]}

DEFAULT_TEMPLATE = ("Classify the text into exactly one of these categories: {labels}.\n\n"
                    "Text: {text}\n\nAnswer with the category name only.")


def _prompt_ids(tokenizer: Any, text: str, labels: Sequence[str], template: str) -> tuple[list[int], str]:
    """Prompt ids and the separator a label follows (none after a chat turn, a space after plain text)."""
    content = template.replace("{labels}", ", ".join(labels)).replace("{text}", text)
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return tokenizer.encode(rendered, add_special=False), ""
    return tokenizer.encode(content + "\nAnswer:", add_special=True), " "


def zero_shot_scores(runner: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[str] | None,
                     template: str | None, multi_label: bool) -> tuple[list[str], np.ndarray]:
    """-> (labels, scores [n, L]): softmax over the labels' summed token log-probabilities."""
    if not labels or len(labels) < 2:
        raise InvalidParameterError("zero-shot classification needs labels= with at least two label names")
    if multi_label:
        raise InvalidParameterError("zero-shot scores labels against each other; multi_label=True needs a "
                                    "classification head (a *ForSequenceClassification model or head=(W, b))")
    template = DEFAULT_TEMPLATE if template is None else template
    if "{text}" not in template:
        raise InvalidParameterError("template must contain {text} (and may contain {labels})")
    # Contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): a small model prefers some labels
    # whatever the text; their log-likelihood after a content-free text is subtracted. It depends only on the
    # labels and the template, so a runner keeps the last few (a text at a time costs one forward, not two).
    priors = _PRIORS.setdefault(runner, {})
    key = (tuple(labels), template)
    if key not in priors:
        if len(priors) >= 16:
            priors.pop(next(iter(priors)))
        priors[key] = _label_logliks(runner, tokenizer, "N/A", labels, template, -1)
    prior = priors[key]
    scores = np.zeros((len(texts), len(labels)), np.float32)
    for i, text in enumerate(texts):
        total = _label_logliks(runner, tokenizer, text, labels, template, i) - prior
        z = np.exp(total - total.max())
        scores[i] = z / z.sum()
    return list(labels), scores


def _label_logliks(runner: Any, tokenizer: Any, text: str, labels: Sequence[str], template: str,
                   i: int) -> np.ndarray:
    """[L]: each label's summed token log-probabilities as the answer to the prompt built from `text`."""
    cfg = runner.cfg
    prompt, sep = _prompt_ids(tokenizer, text, labels, template)
    answers = [tokenizer.encode(sep + label, add_special=False) for label in labels]
    longest = len(prompt) + max(len(a) for a in answers)
    if longest > cfg.max_context:
        raise ContextLengthError(f"text {i} with the prompt is {longest} tokens but the model's context is "
                                 f"{cfg.max_context}; shorten the text")
    t = bucket(longest, MIN_PREFILL_BUCKET)
    tokens, _ = padded([prompt + a for a in answers], t)
    logp = runner.token_logprobs(tokens)  # [B, T-1]
    # The answer's tokens sit at positions len(prompt)..; each is predicted by the position before it.
    return np.array([logp[r, len(prompt) - 1:len(prompt) - 1 + len(a)].sum() for r, a in enumerate(answers)])
