"""Bad input a user can cause gets corejax's own exception with an actionable sentence, and breaks nothing else."""

from __future__ import annotations

import subprocess
import sys

import pytest

import corejax
from corejax import (
    ContextLengthError,
    InvalidParameterError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from tiny_model import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", context=64)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    with corejax.Session(str(tiny_path), progress=False) as session:
        yield session


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither|not found|no such|does not exist"):
        corejax.Session(str(tmp_path / "nope.gguf"), progress=False)


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(ModelNotFoundError) as e:
        corejax.Session("smollm3-9000b", progress=False)
    assert "smollm2-135m-instruct" in str(e.value)


def test_truncated_gguf(tiny_path, tmp_path):
    data = tiny_path.read_bytes()
    for keep in (10, 200, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(ModelFormatError, match="truncated|past the end|too small|corrupt"):
            corejax.Session(str(cut), progress=False)


def test_gguf_with_lying_tensor_count(tiny_path, tmp_path):
    data = bytearray(tiny_path.read_bytes())
    data[8:16] = (10**12).to_bytes(8, "little")  # header: magic, version, then the tensor count
    bad = tmp_path / "lies.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="tensor count"):
        corejax.Session(str(bad), progress=False)


def test_unknown_architecture(tmp_path):
    path = write_tiny_llama(tmp_path / "neox.gguf", arch="gptneox")
    with pytest.raises(UnsupportedModelError, match="'gptneox' is not supported"):
        corejax.Session(str(path), progress=False)


def test_unsupported_tensor_type(tmp_path):
    path = write_tiny_llama(tmp_path / "q81.gguf", unsupported_type=True)
    with pytest.raises(UnsupportedModelError, match="Q8_1"):
        corejax.Session(str(path), progress=False)


def test_prompt_longer_than_context(tiny):
    with pytest.raises(ContextLengthError, match="context is 64"):
        tiny.generate("the " * 100, max_tokens=4)
    with pytest.raises(ContextLengthError, match="empty"):
        tiny.generate("", max_tokens=4)


@pytest.mark.parametrize("kwargs,phrase", [
    (dict(temperature=-1.0), "temperature must be"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_k=-2), "top_k must be"),
    (dict(min_p=float("nan")), "min_p must be"),
    (dict(max_tokens=0), "max_tokens must be"),
    (dict(seed="abc"), "seed must be"),
    (dict(logprobs=99), "logprobs must be"),
    (dict(stop=[""]), "stop must be"),
    (dict(temprature=0.5), "unknown sampling parameter"),
])
def test_invalid_sampling_parameters(tiny, kwargs, phrase):
    with pytest.raises(InvalidParameterError, match=phrase):
        tiny.generate("the cat", **kwargs)


def test_bad_prompt_arguments(tiny):
    with pytest.raises(InvalidParameterError, match="exactly one of prompt"):
        tiny.generate("x", messages=[{"role": "user", "content": "y"}])
    with pytest.raises(InvalidParameterError, match="messages must be a list of dicts"):
        tiny.generate(messages="hello")
    with pytest.raises(InvalidParameterError, match="prompt must be a string"):
        tiny.generate(123)


def test_missing_chat_template(tmp_path):
    path = write_tiny_llama(tmp_path / "notemplate.gguf", chat_template=None)
    with corejax.Session(str(path), progress=False) as session, pytest.raises(UnsupportedModelError,
                                                                             match="chat template"):
        session.generate(messages=[{"role": "user", "content": "hi"}])


def test_errors_lose_nothing(tiny):
    before = tiny.generate("the cat", temperature=0, max_tokens=5)
    for bad in (dict(top_p=7.0), dict(max_tokens=-1)):
        with pytest.raises(InvalidParameterError):
            tiny.generate("the cat", **bad)
    with pytest.raises(ContextLengthError):
        tiny.generate("the " * 100)
    assert tiny.generate("the cat", temperature=0, max_tokens=5).tokens == before.tokens


def test_closed_session(tiny_path):
    session = corejax.Session(str(tiny_path), progress=False)
    session.close()
    with pytest.raises(corejax.CorejaxError, match="closed"):
        session.generate("x")


def test_cli_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "corejax.cli", "generate", "hi", "--model",
                           str(tmp_path / "missing.gguf")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("corejax: error:") and "Traceback" not in proc.stderr
