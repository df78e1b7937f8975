"""Encoder requests on the host: texts -> token ids (truncated or refused), length-sorted batches padded to
power-of-two (batch, length) buckets run through an EncoderRunner (corejax/serving/runner.py), and the
classification scores.

Runs where the model lives (Runtime); the caller only sees numpy arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from corejax.types.config import EncoderConfig
from corejax.serving.batch import bucket, padded
from corejax.kernels.policy import Kernels
from corejax.serving.runner import EncoderRunner
from corejax.errors import InvalidParameterError, UnsupportedModelError

MAX_BATCH = 32  # rows per program; batches of 1..32 rows are padded to 1, 2, 4, .., 32
MIN_LENGTH_BUCKET = 16


class Encoder:
    """One loaded encoder: its params, tokenizer and sentence config (pooling, normalization, max length)."""

    def __init__(self, cfg: EncoderConfig, params: Any, tokenizer: Any, sentence: Any, kernels: Kernels | None = None):
        self.cfg, self.tokenizer, self.sentence = cfg, tokenizer, sentence
        self.runner = EncoderRunner(cfg, params, kernels)  # its programs are freed with this Encoder

    @property
    def dim(self) -> int:
        """The embedding's size: the last Dense module's output, else the encoder's hidden size."""
        return self.sentence.dense[-1].out_features if self.sentence.dense else self.cfg.hidden_size

    def token_ids(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """[CLS] text [SEP] ids, as HF's tokenizer gives them; over-long texts keep their first
        max_length - 1 tokens and the final special token (HF's truncation='longest_first')."""
        limit = self.sentence.max_length
        out = []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text, add_special=True)
            if len(ids) > limit:
                if not truncate:
                    raise InvalidParameterError(
                        f"text {i} is {len(ids)} tokens but the model reads at most {limit}; shorten it or pass "
                        "truncate=True to keep its first tokens")
                ids = ids[:limit - 1] + ids[-1:]
            if max(ids, default=0) >= self.cfg.vocab_size:  # a tokenizer token with no embedding row
                bad = next(t for t in ids if t >= self.cfg.vocab_size)
                raise InvalidParameterError(
                    f"text {i} holds the token {self.tokenizer.tokens[bad]!r} (id {bad}), which this model has no "
                    f"embedding for (it has {self.cfg.vocab_size}); remove it from the text")
            out.append(ids)
        return out

    def run(self, ids: list[list[int]], output: str, normalize: bool = False, head: Any = None,
            scores: str | None = None) -> np.ndarray:
        """ids of n texts -> [n, D] pooled vectors (or [n, L] logits; with head=(W, b), pooled @ W + b; with
        scores "softmax" / "sigmoid", those logits as label scores), rows in input order."""
        width = head[0].shape[1] if head is not None else self.cfg.num_labels if output == "logits" else self.dim
        result = np.zeros((len(ids), width), np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        pending = []
        for start in range(0, len(order), MAX_BATCH):
            rows = order[start:start + MAX_BATCH]
            t = min(bucket(max(len(ids[i]) for i in rows), MIN_LENGTH_BUCKET), self.cfg.max_context)
            tokens, lengths = padded([ids[i] for i in rows], t, pad_length=1)  # padding rows: 1 token, discarded
            # Dispatch every batch before reading any back, so the host work overlaps the device's.
            dense = () if output == "logits" else tuple(m.activation for m in self.sentence.dense)
            out = self.runner.encode(tokens, lengths, output, normalize, head, scores, dense)
            pending.append((rows, out))
        for rows, out in pending:
            result[rows] = np.asarray(out)[:len(rows)]
        return result

    def embed(self, texts: Sequence[str], truncate: bool = True) -> np.ndarray:
        """[n, D] float32 sentence embeddings, pooled and normalised as the model's modules.json says."""
        return self.run(self.token_ids(texts, truncate), self.sentence.pooling, self.sentence.normalize)

    def classify(self, texts: Sequence[str], labels: Sequence[str] | None, head: Any, multi_label: bool | None,
                 truncate: bool = True) -> tuple[list[str], np.ndarray]:
        """-> (labels, scores [n, L]) from the checkpoint's own head, or from head=(W, b) over the embeddings."""
        if head is None:
            if not self.cfg.num_labels:
                raise UnsupportedModelError(
                    "this encoder has no classification head; pass head=(W, b) (a linear layer over its "
                    "embeddings) or use a *ForSequenceClassification model")
            if labels is not None and list(labels) != list(self.cfg.labels):
                raise InvalidParameterError(
                    f"this model's head has its own labels {list(self.cfg.labels)}; omit labels= (zero-shot "
                    "labels need a generative model)")
            multi = self.cfg.multi_label if multi_label is None else multi_label
            return list(self.cfg.labels), self.run(self.token_ids(texts, truncate), "logits",
                                                   scores="sigmoid" if multi else "softmax")
        w, b = check_head(head, self.dim)
        if labels is None or len(labels) != w.shape[1]:
            raise InvalidParameterError(
                f"head=(W, b) scores {w.shape[1]} labels; pass labels= with {w.shape[1]} names"
                f"{'' if labels is None else f' (got {len(labels)})'}")
        ids = self.token_ids(texts, truncate)
        return list(labels), self.run(ids, self.sentence.pooling, self.sentence.normalize, head=(w, b),
                                      scores="sigmoid" if multi_label else "softmax")


def check_head(head: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """head=(W, b): W [D, L] (or torch's [L, D]), b [L] -> float32 (W [D, L], b [L]), or InvalidParameterError."""
    try:
        w, b = head
        w, b = np.asarray(w, np.float32), np.asarray(b, np.float32)
    except (TypeError, ValueError):
        raise InvalidParameterError("head must be a pair (W, b) of numeric arrays: W [dim, labels], b [labels]") \
            from None
    if w.ndim == 2 and w.shape[0] != dim and w.shape[1] == dim:
        w = w.T  # torch.nn.Linear stores [out, in]
    if w.ndim != 2 or w.shape[0] != dim or b.shape != (w.shape[1],):
        raise InvalidParameterError(
            f"head W must be [{dim}, L] (the model's embedding size by the number of labels) and b [L]; got "
            f"W {list(w.shape)} and b {list(b.shape)}")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise InvalidParameterError("head W and b must be finite (no NaN or inf)")
    return w, b
