"""The Session over a sandboxed worker: same output as in-process, the policy engaged in every thread, errors
carried across, several threads and asyncio at once, and a parent that never imports JAX."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import corejax
from corejax.errors import ContextLengthError, InvalidParameterError, ModelFormatError, SandboxError
from corejax.wire import messages as m
from corejax.wire.protocol import Kind
from tiny_model import write_tiny_llama

LAYERS = {"network_namespace", "rlimits", "capabilities", "no_new_privs", "landlock", "landlock_network", "seccomp"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("sandbox") / "tiny.gguf")


@pytest.fixture(scope="module")
def sandboxed(tiny):
    with corejax.Session(str(tiny), progress=False) as session:
        yield session


@pytest.fixture(scope="module")
def in_process(tiny):
    with corejax.Session(str(tiny), sandbox=False, progress=False) as session:
        yield session


def test_parent_never_imports_jax_nor_opens_the_model(tiny):
    code = textwrap.dedent(f"""
        import os, sys, corejax
        with corejax.Session({str(tiny)!r}, progress=False) as s:
            text = s.generate("the sea", max_tokens=3, temperature=0).text
            maps = open("/proc/self/maps").read()
            fds = os.listdir("/proc/self/fd")
            open_files = [os.readlink(f"/proc/self/fd/{{fd}}") for fd in fds if os.path.exists(f"/proc/self/fd/{{fd}}")]
        print(sorted(m for m in sys.modules if m == "jax" or m.startswith(("jax.", "jaxlib"))))
        print({str(tiny)!r} in open_files or {str(tiny)!r} in maps)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "False"]


@pytest.mark.parametrize("prompt", ["the sea", "in a hen"])
def test_greedy_output_equals_in_process(sandboxed, in_process, prompt):
    a = sandboxed.generate(prompt, max_tokens=8, temperature=0, logprobs=2)
    b = in_process.generate(prompt, max_tokens=8, temperature=0, logprobs=2)
    assert (a.text, a.tokens, a.finish_reason, a.prompt_tokens) == (b.text, b.tokens, b.finish_reason,
                                                                        b.prompt_tokens)
    assert [(lp.token, lp.text) for lp in a.logprobs] == [(lp.token, lp.text) for lp in b.logprobs]
    assert [lp.logprob for lp in a.logprobs] == pytest.approx([lp.logprob for lp in b.logprobs], abs=1e-5)
    assert "".join(sandboxed.stream(prompt, max_tokens=8, temperature=0)) == b.text
    chunks = list(sandboxed.stream_chunks(prompt, max_tokens=8, temperature=0))
    reference = list(in_process.stream_chunks(prompt, max_tokens=8, temperature=0))
    assert [(c.text, c.tokens) for c in chunks] == [(c.text, c.tokens) for c in reference]
    assert chunks[-1].result.tokens == b.tokens


def test_chat_messages_and_sampling_with_seed(sandboxed, in_process):
    messages = [{"role": "user", "content": "hi"}]
    a = sandboxed.generate(messages=messages, max_tokens=6, temperature=0.9, seed=3)
    b = in_process.generate(messages=messages, max_tokens=6, temperature=0.9, seed=3)
    assert a.tokens == b.tokens


def test_tokenize_detokenize_info(sandboxed, in_process):
    ids = sandboxed.tokenize("the sea")
    assert ids == in_process.tokenize("the sea") and all(isinstance(i, int) for i in ids)
    assert sandboxed.detokenize(ids) == "the sea"
    info = sandboxed.info()
    assert info["architecture"] == "llama" and info["config"]["num_layers"] == 2


def test_every_layer_is_engaged_and_every_thread_is_filtered(sandboxed):
    sandboxed.generate("the", max_tokens=2)  # XLA's thread pools exist by now
    report = sandboxed.sandbox_report()
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert set(layers) == LAYERS
    missing = [f"{n}: {layer['detail']}" for n, layer in layers.items() if not layer["engaged"]]
    assert not missing
    threads = report["threads"]
    assert threads["threads"] > 1
    assert threads["no_new_privs"] == threads["seccomp_filter"] == threads["threads"]
    for tid in os.listdir(f"/proc/{report['pid']}/task"):
        try:
            status = Path(f"/proc/{report['pid']}/task/{tid}/status").read_text()
        except FileNotFoundError:  # a request's thread that ended after the listing
            continue
        assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status


def test_in_process_report_says_so(in_process):
    assert in_process.sandbox_report() == {"sandbox": False, "pid": None, "layers": [], "threads": None}


def test_user_errors_cross_the_boundary_as_corejax_errors(sandboxed):
    with pytest.raises(ContextLengthError):
        sandboxed.generate("the sea " * 40, max_tokens=8)
    with pytest.raises(InvalidParameterError):
        sandboxed.generate("x", temperature=-1)
    with pytest.raises(InvalidParameterError):
        sandboxed.generate("x", messages=[{"role": "user", "content": "x"}])
    assert sandboxed.generate("the", max_tokens=2).tokens  # the worker is still serving


def test_a_hostile_model_file_fails_in_the_worker(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ModelFormatError):
        corejax.Session(str(bad), progress=False)


def test_a_hostile_files_huge_error_reads_as_a_format_error(tmp_path):
    """A mutated file can make the reader take megabytes of its bytes as a key's name (a string array retyped
    as uint8 did: the next "key" was 700 KB of the strings). The worker's message naming that key was an ERROR
    frame over its 64 KiB limit, so the parent stopped the worker for breaking the protocol (WorkerCrashed).
    The reader shows a long key's start and length, and every error a worker sends is bounded."""
    import gguf_factory as g

    kvs, tensors = g.small_valid_file()
    kvs.append(g.kv("k" * 700_000, 13, bytes(8)))  # a 700 KB key of an unknown value type
    bad = tmp_path / "hostile.gguf"
    bad.write_bytes(g.build(kvs, tensors))
    with pytest.raises(ModelFormatError, match="700,000 characters"):
        corejax.Session(str(bad), progress=False, keep_alive=0)


def test_every_worker_error_fits_its_frame():
    from corejax.wire.protocol import KIND_LIMITS, encode

    for e in (ModelFormatError("x" * 3_000_000), ValueError("\u20ac" * 1_000_000)):
        payload = m.error_to_wire(e)
        assert len(encode(Kind.ERROR, 1, payload)) <= KIND_LIMITS[Kind.ERROR]
        assert "more characters cut" in payload["message"]


def test_probe_frames_are_refused_by_a_normal_worker(sandboxed):
    """Only the test suite's worker (tests/probe_worker.py) runs functions by name; corejax's refuses the kind."""
    frames = list(sandboxed.open_request(Kind.PROBE, {"target": "os:getpid", "args": []}))
    assert frames[-1].kind == Kind.ERROR
    with pytest.raises(SandboxError, match="does not accept PROBE"):
        raise m.error_from_wire(frames[-1].payload)


def test_threads_share_a_session(sandboxed, in_process):
    prompts = ["the sea", "in a", "on the", "her", "sand"]
    expected = {p: in_process.generate(p, max_tokens=5, temperature=0).tokens for p in prompts}
    got, errors = {}, []

    def run(p):
        try:
            got[p] = sandboxed.generate(p, max_tokens=5, temperature=0).tokens
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == expected


def test_callers_read_for_each_other(sandboxed, in_process):
    """Leader/follower reading (WorkerClient.wait): a stream whose consumer pauses holds nobody up, and eight
    threads mixing generations, tokenize and ping calls each get their own replies."""
    expected = in_process.generate("the sea", max_tokens=12, ignore_eos=True, temperature=0).tokens
    paused = sandboxed.stream_chunks("the sea", max_tokens=12, ignore_eos=True, temperature=0)
    next(paused)  # its other chunks arrive while this consumer waits for nothing
    got, errors = {}, []

    def run(i):
        try:
            for _ in range(5):
                if i % 2:
                    assert sandboxed.tokenize(f"text {i}") == in_process.tokenize(f"text {i}")
                    sandboxed.ping()
                else:
                    got[i] = sandboxed.generate("the sea", max_tokens=4, temperature=0).tokens
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors
    assert all(tokens == expected[:4] for tokens in got.values()) and len(got) == 4
    assert list(paused)[-1].result.tokens == expected


def test_a_caller_interrupted_while_waiting_leaves_the_session_working(sandboxed, in_process):
    """Ctrl-C in a notebook lands in the main thread wherever it waits: reading the socket for everyone
    (mid-frame, possibly) or blocked on its mailbox. Either way the other callers' replies and the next
    calls come through intact."""
    import signal

    expected = in_process.generate("the sea", max_tokens=40, ignore_eos=True, temperature=0).tokens
    results, errors = [], []

    def background():
        try:
            for _ in range(3):
                results.append(sandboxed.generate("the sea", max_tokens=40, ignore_eos=True, temperature=0).tokens)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    class Interrupted(Exception):
        pass

    def interrupt(*_):
        raise Interrupted

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        thread = threading.Thread(target=background)
        thread.start()
        for delay in (0.002, 0.01, 0.03, 0.05):
            signal.setitimer(signal.ITIMER_REAL, delay)
            try:
                sandboxed.generate("on the", max_tokens=40, ignore_eos=True, temperature=0)
            except Interrupted:
                pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        thread.join(timeout=120)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert not thread.is_alive() and not errors and results == [expected] * 3
    assert sandboxed.generate("the sea", max_tokens=40, ignore_eos=True, temperature=0).tokens == expected


def test_asyncio_api(sandboxed, in_process):
    expected = in_process.generate("the sea", max_tokens=6, temperature=0).text

    async def main():
        results = await asyncio.gather(*(sandboxed.agenerate("the sea", max_tokens=6, temperature=0)
                                         for _ in range(3)))
        pieces = [piece async for piece in sandboxed.astream("the sea", max_tokens=6, temperature=0)]
        return [r.text for r in results], "".join(pieces)

    texts, streamed = asyncio.run(main())
    assert texts == [expected] * 3 and streamed == expected


def test_abandoned_stream_does_not_block_the_next_request(sandboxed):
    stream = sandboxed.stream("the sea", max_tokens=20, ignore_eos=True, temperature=0)
    next(stream)
    stream.close()  # the worker is told to stop that request
    assert len(sandboxed.generate("the", max_tokens=3, ignore_eos=True).tokens) == 3


def test_closed_session_refuses_calls(tiny):
    s = corejax.Session(str(tiny), progress=False)
    pid = s.worker_pid
    s.close()
    with pytest.raises(corejax.CorejaxError, match="closed"):
        s.generate("x")
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.slow
def test_real_model_sandboxed_equals_in_process(smollm2_gguf):
    with corejax.Session(str(smollm2_gguf), progress=False) as s:
        a = s.generate("The capital of France is", max_tokens=12, temperature=0)
        report = s.sandbox_report()
    with corejax.Session(str(smollm2_gguf), sandbox=False, progress=False) as s:
        b = s.generate("The capital of France is", max_tokens=12, temperature=0)
    assert a.tokens == b.tokens and a.text == b.text
    assert all(layer["engaged"] for layer in report["layers"])


def test_startup_progress_crosses_the_sandbox_and_warmup_compiles(tiny, monkeypatch):
    """The worker reports loading and the warm-up compile as PROGRESS frames; the parent draws them as bars."""
    from corejax.client.workers import WorkerClient

    seen = []
    original = WorkerClient._show_progress
    monkeypatch.setattr(WorkerClient, "_show_progress", lambda self, p: (seen.append(p), original(self, p)))
    with corejax.Session(str(tiny), progress=True, warmup=True) as s:
        assert s.generate("the sea", max_tokens=3, temperature=0, ignore_eos=True).timings.generated_tokens == 3
    stages = [p["stage"] for p in seen]
    assert "loading weights" in stages and stages[-1] == "compiling"
    loads = [p for p in seen if p["stage"] == "loading weights"]
    assert [p["done"] for p in loads] == list(range(1, loads[-1]["total"] + 1))
    assert seen[-1]["done"] == seen[-1]["total"] == 1
    seen.clear()
    with corejax.Session(str(tiny), progress=False) as s:
        s.generate("the sea", max_tokens=1)
    assert seen == []
