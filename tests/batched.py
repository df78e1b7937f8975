"""Test helpers that run several prompts as one batch, so a real-model test compiles one program and runs one
pass (or one batched decode) instead of one per prompt. Both rest on properties other tests prove: causal
attention keeps right-padding out of every real position, and a batched request decodes the greedy tokens it
decodes alone (test_batching_real.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax.numpy as jnp
import numpy as np


def right_padded(id_lists: Sequence[Sequence[int]]) -> np.ndarray:
    """[B, T] int32: each row its ids, then zeros."""
    tokens = np.zeros((len(id_lists), max(map(len, id_lists))), np.int32)
    for r, ids in enumerate(id_lists):
        tokens[r, :len(ids)] = ids
    return tokens


def prompt_logits(params: Any, cfg: Any, id_lists: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Each prompt's logits [len, V] from one forward over the prompts right-padded to one length."""
    from corejax.engine.programs import full_logits

    out = np.asarray(full_logits(params, jnp.asarray(right_padded(id_lists)), cfg=cfg))
    return [out[r, :len(ids)] for r, ids in enumerate(id_lists)]


def concurrently(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """fn over items from one thread each: a Session's or Runtime's requests then share its decode steps."""
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))
