"""The real models vs HF transformers loading the same GGUF (dequantized to f32 by gguf-py): logits, greedy text."""

from __future__ import annotations

import numpy as np
import pytest

from references import require  # noqa: E402

torch = require("torch")
transformers = require("transformers")
require("gguf")

import functools  # noqa: E402

from batched import right_padded  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from corejax.kernels.policy import Kernels  # noqa: E402
from corejax import models  # noqa: E402
from corejax.engine.cache import DenseKVCache  # noqa: E402
from corejax.types.options import SamplingParams
from corejax.hub import ModelSource  # noqa: E402
from corejax.worker.start import open_runtime  # noqa: E402

pytestmark = pytest.mark.slow

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a "
    "notebook in which he recorded the weather, the ships that passed, and the birds that rested on the "
    "gallery rail. In winter the storms came from the north-west and the glass rattled in its frame. "
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Über den Wolken — 雲の上で — au-dessus des nuages: ",
    PARAGRAPH * 9 + "One night, during the worst storm of the year,",  # > 512 tokens: past Gemma's window
]
LOGIT_TOL = 1e-3


def _load(path):
    rt = open_runtime(ModelSource(path.stem, "gguf", path), weights="f32", progress=False)  # the exact model math
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return rt, hf


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logits_at(params, tokens, keep, cfg):
    """tokens [B, T] (right-padded), keep [B, P] positions -> logits [B, P, V]: one program for every prompt,
    the LM head only where compared (Gemma's 262k vocabulary over every position would be GBs)."""
    batch, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    with Kernels.detect().active():  # this process's kernels, as the runtime that loaded the params uses
        hidden, _ = models.forward(params, tokens, positions, DenseKVCache.create(cfg, batch, t), cfg)
        return models.lm_head(params, jnp.take_along_axis(hidden, keep[..., None], axis=1), cfg)


def _our_logits(rt, id_lists, keeps):
    """Each prompt's logits at its `keep` positions, from one forward over the prompts right-padded to one
    length (causal attention keeps the padding out of every real position)."""
    out = np.asarray(_logits_at(rt.model.params, jnp.asarray(right_padded(id_lists)), jnp.asarray(right_padded(keeps)),
                                cfg=rt.model.cfg))
    return [out[r, :len(k)] for r, k in enumerate(keeps)]


def _check_model(path):
    rt, hf = _load(path)
    worst, lengths = [], []
    id_lists = [rt.tokenizer.encode(prompt, add_special=True) for prompt in PROMPTS]
    keeps = [np.unique(np.linspace(0, len(ids) - 1, num=min(len(ids), 12)).astype(int)) for ids in id_lists]
    for prompt, ids, keep, ours in zip(PROMPTS, id_lists, keeps, _our_logits(rt, id_lists, keeps)):
        with torch.no_grad():
            ref = hf(torch.tensor([ids]), logits_to_keep=torch.tensor(keep)).logits[0].float().numpy()
        diff = float(np.abs(ours - ref).max())
        worst.append((len(ids), diff))
        assert diff <= LOGIT_TOL, f"{path.name}: prompt of {len(ids)} tokens: max |logit diff| {diff:.2e}"
        assert (ours.argmax(-1) == ref.argmax(-1)).all()

        result = rt.stream(prompt, None, SamplingParams(temperature=0.0, max_tokens=64))
        ours_tokens = list([c.result for c in result if c.result][0].tokens)
        with torch.no_grad():
            ref_out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64, pad_token_id=0)
        ref_tokens = ref_out[0, len(ids):].tolist()
        assert ours_tokens == ref_tokens, f"{path.name}: greedy continuation differs for {prompt[:30]!r}"
        lengths.append(len(ours_tokens))
    print(f"\n{path.name}: max |logit diff| per prompt (tokens, diff): {worst}; greedy lengths {lengths}")


def test_smollm2_matches_transformers(smollm2_gguf):
    _check_model(smollm2_gguf)


def test_gemma3_matches_transformers(gemma3_gguf):
    _check_model(gemma3_gguf)
