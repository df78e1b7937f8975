"""A step's batch as host arrays: the one place where rows of token ids become the padded, bucketed arrays the
jitted programs take (corejax/engine/programs.py). The scheduler's prefill and decode steps and the draft-model proposer
build `StepBatch`es over the paged cache; the encoder and zero-shot scoring pad plain rows with `padded`. The
sampling half of a batch (per-row settings, keys, penalty state, token masks) is corejax/engine/sampling.py's
`SamplingBatch`.

Shapes are bucketed to powers of two (`bucket`) so that a program compiles once per bucket, not per length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

MIN_PREFILL_BUCKET = 16
MIN_TABLE_PAGES = 16


def bucket(n: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum): few distinct shapes, so few compiles."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def table_width(final_lengths: Sequence[int], page_size: int) -> int:
    """Page-table columns for rows that will reach these lengths, bucketed so a request compiles once."""
    return bucket(max(-(-n // page_size) for n in final_lengths), MIN_TABLE_PAGES)


def padded(rows: Sequence[Sequence[int]], length: int, *, pad_length: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """tokens [bucket(len(rows)), length] (each row right-padded with 0) and lengths [same] (padding rows:
    pad_length)."""
    tokens = np.zeros((bucket(len(rows), 1), length), np.int32)
    lengths = np.full((tokens.shape[0],), pad_length, np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        lengths[i] = len(row)
    return tokens, lengths


def prefill_parts(pending: Iterable[tuple[Sequence[int], int]], budget: int,
                  max_batch: int) -> list[tuple[list[int], bool]]:
    """Which prompts one prefill call takes: pending = (context, tokens already cached) per waiting row, oldest
    first. The first row's next chunk (at most `budget` tokens); when that chunk is its last, also the last
    chunks of the rows behind it that fit the same budget (a burst of short prompts is one call, not one step
    each); a long prompt's middle chunk runs alone. Returns (part, whether it finishes the row) per row taken."""
    group: list[tuple[list[int], bool]] = []
    used = 0
    for context, computed in pending:
        part = list(context[computed:computed + budget])
        final = computed + len(part) >= len(context)
        if group and (not final or used + len(part) > budget or len(group) == max_batch):
            break
        group.append((part, final))
        used += len(part)
        if not final:
            break
    return group


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """One call's rows over the paged KV cache: row i feeds parts[i], continuing its sequence at starts[i].

    tokens, positions [B, T]; lengths [B] (each row's length after this step); last [B] (index of each row's
    last fed token); table [B, W] (its pages). B = bucket(rows), T = bucket(longest part, min_t); padding rows
    and columns are zeros (written to page 0, which no sequence owns, and ignored)."""

    tokens: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray
    last: np.ndarray
    table: np.ndarray
    rows: int

    @classmethod
    def build(cls, parts: Sequence[Sequence[int]], starts: Sequence[int], seqs: Sequence[int], allocator: Any,
              width: int, min_t: int = 1) -> StepBatch:
        b = bucket(len(parts), 1)
        t = bucket(max(len(p) for p in parts), min_t)
        tokens = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        lengths = np.zeros((b,), np.int32)
        last = np.zeros((b,), np.int32)
        for i, (part, start) in enumerate(zip(parts, starts)):
            tokens[i, :len(part)] = part
            positions[i] = np.arange(start, start + t)
            lengths[i] = start + len(part)
            last[i] = len(part) - 1
        table = np.zeros((b, width), np.int32)
        table[:len(parts)] = allocator.page_table(list(seqs), width)
        return cls(tokens, positions, lengths, last, table, len(parts))

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape

    def cache(self, cache: Any) -> Any:
        """The paged cache viewed through this batch's page table and lengths."""
        return cache.with_rows(self.table, self.lengths)
