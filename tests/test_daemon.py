"""Keep-alive (corejax/client/keepalive.py, corejax/daemon.py): a Session in a new process finds its model loaded in the
kept server and gets what a worker of its own gives (results, logprobs, errors, the sandbox report) without
importing JAX; a killed server is replaced; an idle one leaves; `corejax generate` uses the same servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import corejax
from corejax.client import keepalive
from tiny_model import write_tiny_llama

# One request, run in a fresh process: what a script sees, and whether it imported JAX.
CLIENT = r"""
import json, sys
import corejax
keep_alive = float(sys.argv[2])
with corejax.Session(sys.argv[1], keep_alive=keep_alive, progress=False) as s:
    r = s.generate("hello there", max_tokens=6, temperature=0, logprobs=2)
    report = [(layer["name"], layer["engaged"]) for layer in s.sandbox_report()["layers"]]
    print(json.dumps({"text": r.text, "tokens": list(r.tokens), "finish_reason": r.finish_reason,
                      "prompt_tokens": list(r.prompt_tokens), "generated": r.timings.generated_tokens,
                      "logprobs": [[lp.token, round(lp.logprob, 5), [t for t, _ in lp.top]] for lp in r.logprobs],
                      "report": report, "worker_pid": s.worker_pid, "jax": "jax" in sys.modules}))
"""


@pytest.fixture
def tiny(tmp_path: Path):
    """A model no other test keeps (its own file: its own kept server); every server of it stops afterwards."""
    path = tmp_path / "kept.gguf"
    write_tiny_llama(path, context=128)
    yield path
    keepalive.stop([str(path)])


def _client(path: Path, keep_alive: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", CLIENT, str(path), str(keep_alive)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _servers(path: Path) -> list[int]:
    return [s["pid"] for s in keepalive.running() if s["path"] == str(path)]


def test_a_second_process_uses_the_kept_server(tiny):
    first = _client(tiny, 60)
    servers = _servers(tiny)
    assert len(servers) == 1
    second = _client(tiny, 60)
    assert _servers(tiny) == servers and second["worker_pid"] == first["worker_pid"]  # nothing started again
    own = _client(tiny, 0)  # a worker of its own, as before keep-alive
    assert own["worker_pid"] != first["worker_pid"]
    for r in (first, second, own):
        r.pop("worker_pid")
    assert first == second == own
    assert not first["jax"] and first["generated"] == 6
    assert dict(first["report"])["seccomp"] and dict(first["report"])["landlock"]


def test_errors_info_and_options_through_the_kept_server(tiny):
    with corejax.Session(tiny, keep_alive=60, progress=False) as kept, \
            corejax.Session(tiny, keep_alive=0, progress=False) as own:
        assert _parent(kept.worker_pid) in _servers(tiny) and _parent(own.worker_pid) == os.getpid()
        for s in (kept, own):
            with pytest.raises(corejax.ContextLengthError, match="context is 128"):
                s.generate("hello " * 200, max_tokens=4)  # the worker's error, relayed as it is
            with pytest.raises(corejax.InvalidParameterError):
                s.generate("hi", top_p=3.0)
        assert kept.tokenize("hello there") == own.tokenize("hello there")
        assert kept.detokenize([94, 56]) == own.detokenize([94, 56])
        assert kept.info()["architecture"] == own.info()["architecture"]
        streamed = "".join(kept.stream("hello", max_tokens=5, temperature=0))
        assert streamed == own.generate("hello", max_tokens=5, temperature=0).text
    with corejax.Session(tiny, keep_alive=60, progress=False, kv_dtype="float32"):
        assert len(_servers(tiny)) == 2  # other options (the default KV is bf16): another server


def _parent(pid: int) -> int:
    """A process's parent, from /proc (the field after the parenthesised command name)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_killed_kept_server_is_replaced(tiny):
    with corejax.Session(tiny, keep_alive=60, progress=False) as s:
        before = s.generate("hello", max_tokens=4, temperature=0)
        (server,) = _servers(tiny)
        os.kill(server, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{server}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        after = s.generate("hello", max_tokens=4, temperature=0)  # a new server starts under the Session
        assert after.tokens == before.tokens
        assert _servers(tiny) and server not in _servers(tiny)


def test_a_kept_server_killed_mid_stream_is_a_clear_error_and_the_next_call_starts_another(tiny):
    with corejax.Session(tiny, keep_alive=60, progress=False) as s:
        expected = s.generate("hello", max_tokens=4, temperature=0).tokens
        (server,) = _servers(tiny)
        stream = s.stream_chunks("hello", max_tokens=100, temperature=0, ignore_eos=True)
        next(stream)
        os.kill(server, signal.SIGKILL)
        with pytest.raises(corejax.errors.SandboxError, match=r"(?i)worker|server") as info:
            for _ in stream:
                pass
        assert len(str(info.value)) < 1000
        assert s.generate("hello", max_tokens=4, temperature=0).tokens == expected
        assert _servers(tiny) and server not in _servers(tiny)


def test_two_first_runs_at_once_start_one_server(tiny):
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, str(tiny), "60"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    results = [json.loads(o.splitlines()[-1]) for o, _ in outs]
    assert len(_servers(tiny)) == 1 and results[0]["worker_pid"] == results[1]["worker_pid"]
    assert results[0]["tokens"] == results[1]["tokens"]


def test_the_kept_server_leaves_when_idle(tiny):
    with corejax.Session(tiny, keep_alive=1, progress=False) as s:
        s.generate("hi", max_tokens=2)
        time.sleep(2)
        assert len(_servers(tiny)) == 1  # a connected Session keeps it
    deadline = time.monotonic() + 30
    while _servers(tiny) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _servers(tiny), "the kept server did not leave 1 s after its last Session"


def test_a_model_that_fails_to_load_fails_the_same_way(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    for keep_alive in (60, 0):
        with pytest.raises(corejax.ModelFormatError):
            corejax.Session(bad, keep_alive=keep_alive, progress=False)
    assert not _servers(bad)


def test_bad_keep_alive_is_a_clear_error():
    with pytest.raises(corejax.InvalidParameterError, match="keep-alive must be"):
        corejax.Session(keep_alive="soon")
    proc = subprocess.run([sys.executable, "-m", "corejax.cli", "generate", "--keep-alive", "soon", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "keep-alive must be" in proc.stderr


# `corejax generate` on the real default model, through the same servers; the client is watched for JAX.
CLI = "import sys; from corejax.cli import main; rc = main(sys.argv[1:]); assert 'jax' not in sys.modules; sys.exit(rc)"
ARGS = ["-n", "12", "--greedy", "The capital of France is"]


def _generate(*args: str, keep_alive: str) -> str:
    proc = subprocess.run([sys.executable, "-c", CLI, "generate", "-q", "--keep-alive", keep_alive, *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_the_command_uses_the_kept_server(smollm2_gguf):
    try:
        first = _generate(*ARGS, "-m", str(smollm2_gguf), "--kv-dtype", "bf16", keep_alive="60")
        servers = _servers(smollm2_gguf)
        assert len(servers) == 1
        second = _generate(*ARGS, "-m", str(smollm2_gguf), "--kv-dtype", "bf16", keep_alive="60")
        assert _servers(smollm2_gguf) == servers  # the same process answered: nothing was started or loaded
        local = _generate(*ARGS, "-m", str(smollm2_gguf), "--kv-dtype", "bf16", keep_alive="0")
        assert first == second == local and "Paris" in first
    finally:
        keepalive.stop([str(smollm2_gguf)])
