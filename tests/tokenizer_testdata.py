"""Test data for the tokenizer tests: llama.cpp's reference vocabularies and GGUF metadata reading."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any


MARKER = "\n__ggml_vocab_test__\n"
LLAMA_CPP_PYTHON = "0.3.36"  # pinned: its vendored llama.cpp fixes the reference vectors we test against


def cache_dir() -> Path:
    root = os.environ.get("COREJAX_TEST_DATA") or os.path.expanduser("~/.cache/corejax/testdata")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def llama_vocab_dir() -> Path:
    """vendor/llama.cpp/models/ggml-vocab-* from the llama-cpp-python sdist (downloaded once, never built)."""
    out = cache_dir() / f"llama-vocab-{LLAMA_CPP_PYTHON}"
    if (out / "ggml-vocab-gpt-2.gguf.out").exists():
        return out
    sdists = sorted(cache_dir().glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache_dir())],
                       check=True, capture_output=True)
        sdists = sorted(cache_dir().glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    out.mkdir(exist_ok=True)
    with tarfile.open(sdists[-1]) as tar:
        for member in tar.getmembers():
            name = member.name.split("/")
            if len(name) >= 2 and name[-2] == "models" and name[-1].startswith("ggml-vocab-") and member.isfile():
                member.name = name[-1]
                tar.extract(member, out, filter="data")
    return out


def read_vectors(gguf_path: Path) -> list[tuple[str, list[int]]]:
    """The (text, expected ids) pairs of a ggml-vocab-*.gguf.inp/.out, split as test-tokenizer-0 splits them."""
    texts = Path(str(gguf_path) + ".inp").read_text(encoding="utf-8").split(MARKER)
    if texts and texts[-1] == "":
        texts = texts[:-1]
    outs = Path(str(gguf_path) + ".out").read_text(encoding="utf-8").split(MARKER)
    outs = [o for o in outs if o != ""] if len(outs) > len(texts) else outs
    lines = Path(str(gguf_path) + ".out").read_text(encoding="utf-8").split("\n")
    ids = [[int(x) for x in line.split()] for line in lines[: len(texts)]]
    assert len(ids) == len(texts), gguf_path
    return list(zip(texts, ids))


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """GGUF metadata as a dict; corejax's reader when it exists, gguf-py otherwise (tests only)."""
    from corejax.loading.gguf import read_gguf

    return dict(read_gguf(path).metadata)


def chat_templates_dir() -> Path:
    """vendor/llama.cpp/models/templates/*.jinja from the same sdist: real chat templates of model families,
    as their tokenizer_config.json files carry them."""
    llama_vocab_dir()  # downloads the sdist once
    out = cache_dir() / f"llama-templates-{LLAMA_CPP_PYTHON}"
    if any(out.glob("*.jinja")):
        return out
    out.mkdir(exist_ok=True)
    with tarfile.open(sorted(cache_dir().glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))[-1]) as tar:
        for member in tar.getmembers():
            name = member.name.split("/")
            if len(name) >= 2 and name[-2] == "templates" and name[-1].endswith(".jinja") and member.isfile():
                member.name = name[-1]
                tar.extract(member, out, filter="data")
    return out
