"""The real GGUF models with their quantized blocks kept (weights="native", the native kernel: activations
rounded to int8 twice) against the exact dequantized model (weights="f32", itself checked against HF
transformers in test_parity_hf.py).

Measured on eight prompts:
  SmolLM2-135M Q4_1:     last-token logits 0.01-0.04% relative RMS from the exact model, argmax the same 8/8,
                         greedy 32 tokens identical on 8/8 prompts. (llama.cpp on the same file, which rounds
                         activations once: 1.7-14% from the exact model, greedy identical on 1/8.)
  Gemma-3-270M Q4_K_M:   0.00-0.02%, argmax 8/8, greedy identical on 8/8 (llama.cpp: 2.3-6.9%, 6/8).
"""

from __future__ import annotations

import numpy as np
import pytest

from corejax.kernels.policy import Kernels

import corejax
from batched import concurrently, prompt_logits
from corejax.hub import ModelSource
from corejax.kernels import ffi
from corejax.worker.start import open_runtime

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
           "List three colors:", "Once upon a time, in a small village,", "The quick brown fox",
           "Explain photosynthesis in one sentence.", "1, 2, 3, 4, 5,"]


@pytest.mark.parametrize("model,max_rel,argmax,greedy", [("smollm2_gguf", 2e-3, 8, 7), ("gemma3_gguf", 2e-3, 8, 7)])
def test_native_weights_vs_the_exact_model(model, max_rel, argmax, greedy, request):
    if not ffi.ensure():
        pytest.skip("native kernels not built here (no C++ compiler)")
    path = request.getfixturevalue(model)
    source = ModelSource(path.stem, "gguf", path)
    sp = corejax.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    logits, tokens = {}, {}
    for weights in ("f32", "native"):
        rt = open_runtime(source, weights=weights, progress=False)
        assert rt.model.info["weights"] == weights
        ids = [rt.prompt_ids(p, None) for p in PROMPTS]
        logits[weights] = [x[-1] for x in prompt_logits(rt.model.params, rt.model.cfg, ids)]
        # The prompts decode as one batch (tests/batched.py): 32 steps, not 256.
        tokens[weights] = concurrently(lambda p: list(rt.stream(p, None, sp))[-1].result.tokens, PROMPTS)
        if weights == "native":
            assert rt.model.info["weight_bytes"] < 1.15 * path.stat().st_size  # the file's blocks, not floats
    rel = [np.linalg.norm(a - b) / np.linalg.norm(a) for a, b in zip(logits["f32"], logits["native"])]
    assert max(rel) < max_rel, rel
    assert sum(a.argmax() == b.argmax() for a, b in zip(logits["f32"], logits["native"])) >= argmax
    assert sum(a == b for a, b in zip(tokens["f32"], tokens["native"])) >= greedy


def test_default_weights_keep_a_quantized_gguf_quantized(smollm2_gguf):
    from corejax.loading.loader import default_weights

    source = ModelSource(smollm2_gguf.stem, "gguf", smollm2_gguf)
    assert default_weights(source, Kernels(native=True, isa="avx2")) == "native"
    assert default_weights(source, Kernels.xla()) == "f32"
