"""Runs every script in examples/ as a user would (a fresh interpreter, another working directory) with the
default model (and gemma3-270m for models.py), checking it exits cleanly and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT_S = 600  # a cold start compiles every sampler variant; warm runs take seconds to half a minute

# script -> fragments its stdout must contain (greedy outputs are deterministic, so a few are checked too)
EXPECTED = {
    "generate.py": ["prompt:     'The three primary colours are'", "completion: ", "sampled:    "],
    "stream.py": ["Here is a short story about a robot who learns to paint:"],
    "session.py": ["model: ", "finish_reason: length", "timings:       ", "decode ", "tok/s",
                   "tokenize('Hello, corejax!') = ", "-> 'Hello, corejax!'"],
    "chat.py": ["user:      What is the capital of France?", "assistant: ", "Paris",
                "user:      What is a famous landmark there?"],
    "sampling.py": ["seed 1234 reproduced: True", "top_k=5", "repetition_penalty=1.3",
                    "finish_reason=stop", "finish_reason=length", "top alternatives", "' Rome'",
                    "InvalidParameterError: top_p"],
    "many_streams.py": ["4 concurrent streams: ", "tok/s in all", "  the sea: ", "speculative ngram: same text: True",
                      "drafted tokens accepted"],
    "openai_client.py": ["model: smollm2-135m-instruct", "chat: 'The capital of France is Paris.'",
                         "finish_reason=stop", "stream: "],
    "models.py": ["smollm2-135m-instruct", "gemma3-270m: gguf at ", "cached=True", "gemma3 model",
                  "completion: ", "ModelNotFoundError: ", "Did you mean 'gemma3-270m'?"],
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


def _run(script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script: str, tmp_path: Path):
    proc = _run(script, tmp_path)
    for fragment in EXPECTED[script]:
        assert fragment in proc.stdout, f"{script}: {fragment!r} not in its output:\n{proc.stdout}"


def test_stream_prints_pieces(tmp_path: Path):
    proc = _run("stream.py", tmp_path, "--max-tokens", "8", "Once upon a time")
    assert proc.stdout.startswith("Once upon a time")
    assert len(proc.stdout.strip()) > len("Once upon a time")
    assert "pieces streamed" in proc.stderr


def test_model_flag(tmp_path: Path):
    proc = _run("generate.py", tmp_path, "--model", "gemma3-270m", "--max-tokens", "8", "The sky is")
    assert "prompt:     'The sky is'" in proc.stdout and "completion: " in proc.stdout
