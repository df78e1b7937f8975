"""The micro suite's cases under pytest-benchmark: protocol codec, page allocator, sampler, tokenizer.

    pytest benchmarks/test_micro.py -o addopts="" [--benchmark-autosave] [--benchmark-compare]

The same callables `corejax bench --suite micro` times (corejax/bench/micro.py); the tokenizer cases use the
default model's vocabulary (pulled into the corejax cache on first use).
"""

import pytest

from corejax import hub
from corejax.bench.micro import cases
from corejax.bench.text import corejax_tokenizer

pytest.importorskip("pytest_benchmark")
CASES = cases(corejax_tokenizer(hub.resolve(hub.DEFAULT_MODEL, progress=False)))


@pytest.mark.parametrize("name", list(CASES))
def test_micro(benchmark, name):
    benchmark(CASES[name])
