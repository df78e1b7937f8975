"""Run by tests/test_sharding.py in a fresh process with N forced host devices: one model's logits, greedy
tokens and per-device weight bytes on 1, 2 and 4 devices, printed as one JSON line."""

from __future__ import annotations

import json
import sys

import numpy as np


def main(name: str, path: str, counts: list[int], sandboxed: bool) -> None:
    import jax

    from corejax.engine import sharding
    from corejax.types.config import EngineConfig
    from corejax.hub import ModelSource
    from corejax.types.options import SamplingParams
    from corejax.worker.start import open_runtime

    from pathlib import Path

    source = ModelSource(name, "gguf", Path(path))
    prompt = "The capital of France is"
    out = {"devices_seen": jax.device_count(), "runs": {}}
    reference = None
    for n in counts:
        rt = open_runtime(source, progress=False, engine=EngineConfig(devices=n, kv_cache_tokens=1024))
        ids = np.asarray([rt.tokenizer.encode(prompt)], np.int32)
        logits = np.asarray(rt.runner.full_logits(ids))
        *_, last = rt.stream(prompt, None, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        reference = logits if reference is None else reference
        pages = rt.runner.cache.k_pages
        out["runs"][n] = {
            "tokens": list(last.result.tokens),
            "max_abs_logit_diff": float(np.abs(logits - reference).max()),
            "max_abs_logit": float(np.abs(reference).max()),
            "weight_bytes_per_device": sharding.bytes_per_device(rt.runner.params),
            "layer_bytes_per_device": sharding.bytes_per_device(rt.runner.params["layers"]),
            "kv_bytes_per_device": sharding.bytes_per_device(pages),
            "kv_devices": len(pages.sharding.device_set),
            "native_kernels": rt.info()["native_kernels"],
        }
        del rt
    if sandboxed:  # the same through a sandboxed Session: the worker sees the devices too
        import corejax

        with corejax.Session(path, devices=counts[-1], progress=False, kv_cache_tokens=1024) as s:
            out["sandboxed_tokens"] = list(s.generate(prompt, temperature=0, max_tokens=8, ignore_eos=True).tokens)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(n) for n in sys.argv[3].split(",")], sys.argv[4] == "1")
