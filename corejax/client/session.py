"""Session: one model served by a worker, many requests. By default the worker is a sandboxed subprocess
(corejax/sandbox/): this process only resolves the model's path, sends requests and reads results — it never
imports JAX nor parses a model file. sandbox=False runs the same worker loop on a thread of this process."""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from corejax import hub, native
from corejax.types.config import WEIGHT_MODES, EngineConfig
from corejax.types.cluster import Cluster
from corejax.types.options import SamplingParams, SpeculativeConfig
from corejax.errors import CorejaxError, InvalidParameterError, RequestTimeout, SandboxError, WorkerCrashed
from corejax.types.filter import Blocklist
from corejax.client.keepalive import KeptServer, parse_duration
from corejax.types.options import check_prompt
from corejax.types.results import Chunk, Classification, GenerationResult
from corejax.wire import messages as wire
from corejax.wire import protocol
from corejax.client.aio import AsyncSession
from corejax.tools import ChatFormat, ToolRequest, parse_chunks
from corejax.tools import prepare as prepare_chat
from corejax.client.requests import SESSION_DEFAULT, Cancel, RawRequest, as_texts, text_batches
from corejax.client.workers import WORKER_MODULE, WorkerClient
from corejax.sandbox.layer import sandbox_require as sandbox_require_of
from corejax.client.processes import thread_status
from corejax.wire.messages import Ended
from corejax.wire.codec import ProtocolError
from corejax.wire.protocol import Kind

_RETRIES = 2  # a request that had not started is re-sent to this many fresh workers before it fails


class Session(AsyncSession):
    """`Session(model)` serves `model` (a registry name, a .gguf path or an HF folder; None = the default).

    sandbox: run the model in a restricted subprocess (True) or on a thread of this process (False).
    progress: progress bars for fetching the model, loading its weights (reported by the worker) and warming up.
    warmup: compile the programs a first short request runs while starting (with a "compiling" bar), so the
    first request does not wait for the compiler; from the persistent cache on later starts. Default: when
    sandboxed. warmup="batches" also compiles every batch and chunk bucket that streams joining and leaving
    a batch meet (decode at 1-16 rows, prefill chunks of 16-512 tokens), as `corejax serve` does: a longer first
    start (seconds per program on 2 cores; later starts read them from the cache), then no compile mid-serve.
    A sandboxed worker's programs persist for later workers of the model only if it compiled them
    before its first request (a request that compromised a worker must not reach later ones), so without the
    warm-up every new worker compiles its first request's programs again.
    max_prefill_stall: seconds a new prompt's prefill may delay the streams already decoding, per step (default
        1.0): while others decode, a step prefills the largest chunk measured to fit it (corejax/serving/pacing.py).
        Lower keeps inter-token gaps short under new arrivals; higher gets new prompts to their first token sooner.
    memory_limit: bytes (or a size such as "2GiB") the worker may use. The worker reserves its weights, KV
        pool and workspace against it before allocating them (corejax/worker/memory.py), failing with
        MemoryBudgetError if they cannot fit; a worker whose resident memory passes it anyway is stopped and its
        request fails with WorkerCrashed. timeout: seconds a request may run once the worker starts it; past it the
        worker is stopped and the request fails with RequestTimeout. Either way the next call starts a new
        worker, and requests that had not started yet are sent to it rather than lost.
    sandbox_require: the sandbox fails closed: a layer of the worker's policy that this kernel offers but that
        did not engage (Landlock, seccomp, the network namespace, ...) stops the Session before the model is
        opened, with a SandboxError naming it. {name: False} waives a layer; {name: True} insists on one even
        where the kernel lacks it (then nothing runs there). The names: corejax.sandbox.layer.SANDBOX_LAYERS.
    speculative: the default speculative decoding of every request, e.g. {"method": "ngram"} or
        {"method": "draft", "draft_model": "...", "k": 4} (see corejax.SpeculativeConfig); a request's own
        speculative=... overrides it (None turns it off). A draft model used by any request must be named here
        when sandboxed: the worker may read only the files it was started with.
    weights: "f32", "native" (a quantized GGUF kept quantized: the default for one where the native kernels
        build), "int8" / "int4" (quantized at load), or for encoders "bf16" (matrices and their inputs rounded
        to bfloat16, products summed in float32: the default where the CPU has AVX512_BF16) or "f16"
        (float16 matrices, computed in float32: the default elsewhere the native kernels build); "f32" is exact.
    output_filter: a corejax.Blocklist checked on the generated text in the worker (after NFC normalisation
        and case folding); a hit ends the generation before the match with finish_reason "content_filter".
    devices: split the model tensor-parallel over this many devices (GPUs, or host devices forced with
        XLA_FLAGS=--xla_force_host_platform_device_count=N on a CPU; corejax/engine/sharding.py); float weights.
    cluster: one process of several, each on its own host, serving one model split over all their devices
        (corejax.Cluster(coordinator="HOST:PORT", num_processes=N, process_id=I), or the same as a
        dict): process 0 takes the requests and schedules; every other process calls follow(), which returns
        when process 0 closes. Start them all with the same model and options (docs/DISTRIBUTED.md).
    keep_alive: seconds (or "30s", "5m", "1h"; default $COREJAX_KEEP_ALIVE, else 5 minutes) the sandboxed worker
        stays loaded in a background process after the last Session using it closes, as `corejax generate`
        keeps its model (corejax/client/keepalive.py): a Session in a new process with the same model and options
        finds it loaded and starts in a fraction of a second. The sandbox, results and errors are the same; 0
        starts a worker of this Session's own, which leaves with it. sandbox=False and clusters never keep one.
    Thread-safe and concurrent: requests from several threads or asyncio tasks run batched together in the
    worker (continuous batching), each streaming its own tokens.
    """

    # The test suite's probe Session (tests/probes.py) runs its own worker module, with or without a model.
    _worker_module = WORKER_MODULE
    _format: ChatFormat | None = None  # the model's chat format (tool calls, reasoning), read on the first chat

    def __init__(self, model: str | None = None, *, sandbox: bool = True, memory_limit: int | str | None = None,
                 timeout: float | None = None, weights: str | None = None, kv_dtype: str = "bf16",
                 kv_cache_tokens: int | None = None, prefix_cache: bool = True, progress: bool = True,
                 speculative: Any = None, warmup: bool | str | None = None, max_prefill_stall: float = 1.0,
                 start_timeout: float = 600.0, sandbox_require: Mapping[str, bool] | None = None,
                 output_filter: Blocklist | None = None, devices: int = 1, cluster: Any = None,
                 keep_alive: float | str | None = None, _pythonpath: Sequence[str] = (),
                 _on_progress: Callable[[dict], None] | None = None):
        if memory_limit is not None:
            from corejax.types.sizes import parse_size

            memory_limit = parse_size(memory_limit)  # bytes, or "2GiB", "512MiB", "1.5GB"
        if timeout is not None and not timeout > 0:
            raise InvalidParameterError(f"timeout must be a positive number of seconds; got {timeout!r}")
        if weights is not None and weights not in WEIGHT_MODES:
            raise InvalidParameterError(f"weights must be one of {', '.join(WEIGHT_MODES)}; got {weights!r}")
        self._require = sandbox_require_of(sandbox_require)
        # Validated here, in the parent, before a worker starts.
        engine = EngineConfig(kv_dtype=kv_dtype, kv_cache_tokens=kv_cache_tokens, prefix_cache=prefix_cache,
                              devices=devices, max_prefill_stall=max_prefill_stall)
        if warmup not in (None, True, False, "batches"):
            raise InvalidParameterError(f'warmup must be True, False or "batches"; got {warmup!r}')
        if output_filter is not None and not isinstance(output_filter, Blocklist):
            raise InvalidParameterError("output_filter must be a corejax.Blocklist, e.g. Blocklist(['word']); "
                                        f"got {type(output_filter).__name__}")
        self.output_filter = output_filter
        self.cluster = Cluster.of(cluster)
        self._options = {"weights": weights, "engine": dataclasses.asdict(engine), "memory_limit": memory_limit,
                         "progress": bool(progress), "warmup": sandbox if warmup is None else warmup,
                         "output_filter": None if output_filter is None else output_filter.to_wire(),
                         "cluster": None if self.cluster is None else self.cluster.to_wire()}
        # Resolving maps a name to a path (pulling it on first use); it never opens the model file itself.
        harness = self._worker_module != WORKER_MODULE
        self.source = hub.resolve(model, progress=progress) if model is not None or not harness else None
        self._progress = progress
        self.speculative = self._speculative(speculative)
        if self.speculative is not None and self.speculative.draft_model is not None:
            self._options["draft_read"] = self.speculative.draft_model  # the sandbox may read the draft's file
        self.sandbox = bool(sandbox)
        self.memory_limit = memory_limit
        self.timeout = timeout
        self.keep_alive = parse_duration(keep_alive)
        self._kept = self._kept_server(engine)
        if sandbox and self._kept is None and (kernel := native.build()) is not None:
            self._options["native_kernels"] = str(kernel)  # built here: the sandboxed worker cannot compile
        self._start_timeout = start_timeout
        self._pythonpath = tuple(str(p) for p in _pythonpath)
        self._on_progress = _on_progress
        self._client_lock = threading.Lock()
        self._closed = False
        self._client: WorkerClient | None = None
        self._client = self._new_client()
        self._finalizer = weakref.finalize(self, _close_client, [self._client])

    # --- the worker ----------------------------------------------------------------------------------------

    def _kept_server(self, engine: EngineConfig) -> KeptServer | None:
        """The kept server this Session's model runs in (corejax/client/keepalive.py), or None for a worker of its own:
        keep_alive=0, sandbox=False (the model runs in this process), a cluster, or a test harness."""
        harness = self._worker_module != WORKER_MODULE
        if not self.sandbox or self.keep_alive <= 0 or self.cluster is not None or harness:
            return None
        spec = self.speculative
        settings = {"memory_limit": self.memory_limit, "timeout": self.timeout, "weights": self._options["weights"],
                    "kv_dtype": engine.kv_dtype, "kv_cache_tokens": engine.kv_cache_tokens,
                    "prefix_cache": engine.prefix_cache, "devices": engine.devices,
                    "max_prefill_stall": engine.max_prefill_stall,
                    "speculative": None if spec is None else spec.to_wire(), "sandbox_require": self._require,
                    "output_filter": None if self.output_filter is None else list(self.output_filter.patterns)}
        server = KeptServer(self.source, settings)
        return server if server.usable else None

    def _new_client(self) -> WorkerClient:
        if self._kept is not None:
            return self._kept.connect(self.keep_alive, progress=self._progress, warmup=self._options["warmup"],
                                      start_timeout=self._start_timeout)
        return WorkerClient(self.source, sandbox=self.sandbox, memory_limit=self.memory_limit, timeout=self.timeout,
                            module=self._worker_module, pythonpath=self._pythonpath, start_timeout=self._start_timeout,
                            options=self._options, require=self._require, on_progress=self._on_progress)

    def _current_client(self) -> WorkerClient:
        with self._client_lock:
            if self._closed:
                raise CorejaxError("this Session is closed; create a new one")
            if self._client is None or self._client.dead:
                old, self._client = self._client, None
                if old is not None:
                    old.close()
                self._client = self._new_client()
                self._finalizer.detach()
                self._finalizer = weakref.finalize(self, _close_client, [self._client])
            return self._client

    @property
    def worker_pid(self) -> int | None:
        """The worker process's id (None for sandbox=False or before it starts)."""
        client = self._client
        return client.pid if client is not None else None

    @property
    def _runtime(self) -> Any:
        """sandbox=False only: the Runtime on this process's worker thread (tests inspect the model with it)."""
        if self.sandbox:
            raise AttributeError("a sandboxed Session has no Runtime in this process; use sandbox=False")
        return self._current_client().runtime

    def _frames(self, msg: Any, cancel: Cancel | None = None) -> Iterator[protocol.Frame]:
        """Reply frames of one request, to its RESULT; restarts the worker and re-sends a request not begun.
        cancel: another thread may call it to stop the request at once; the frames then just end."""
        for attempt in range(_RETRIES + 1):
            client = self._current_client()
            req = client.submit(msg.KIND, msg.to_wire())
            done = False
            if cancel is not None:
                cancel.track(client, req)
            try:
                while True:
                    event = client.wait(req)
                    if isinstance(event, wire.Terminal):
                        if event.ended == Ended.CANCELLED:
                            done = True
                            return
                        if event.ended == Ended.RETRY and attempt < _RETRIES:
                            break
                        done = True
                        if event.ended == Ended.TIMEOUT:
                            raise RequestTimeout(f"the request did not finish within {self.timeout:g} s "
                                                 f"({event.message}); a new worker starts for the next call.")
                        raise WorkerCrashed(f"the request failed because {event.message}; a new worker starts for the next "
                                            "call. If this repeats, the model file may be corrupt or hostile, or the "
                                            "memory_limit too low.")
                    if event.kind == Kind.STARTED:
                        continue
                    if event.kind == Kind.ERROR:
                        done = True
                        raise wire.error_from_wire(event.payload)
                    if event.kind == Kind.RESULT:
                        done = True
                    yield event
                    if done:
                        return
            finally:
                if not done:
                    client.forget(req)
        raise AssertionError("unreachable")

    def open_request(self, kind: Kind, payload: dict) -> RawRequest:
        """One request frame sent to the worker as it is (a dead worker is replaced first); the handle yields the
        worker's reply frames, then a messages.Terminal if the worker never finished it. The kept server
        (corejax/daemon.py) relays other processes' requests through it; callers of this process use the typed
        methods below."""
        client = self._current_client()
        return RawRequest(client, client.submit(kind, payload))

    def _call(self, msg: Any) -> Any:
        """Sends one typed request (corejax/wire/messages.py) and returns its typed result."""
        for frame in self._frames(msg):
            if frame.kind == Kind.RESULT:
                return self._read(wire.read_result, msg.KIND, frame.payload)
        raise WorkerCrashed("the worker ended a request without a result")

    def _read(self, fn: Callable, *args: Any) -> Any:
        """fn(*args) over a worker's payload; a payload it cannot read (a compromised or broken worker) stops that
        worker and fails this call with a SandboxError, never with whatever the reader raised."""
        try:
            return fn(*args)
        except ProtocolError as e:
            client = getattr(self, "_client", None)
            if client is not None:
                client.kill(f"it broke the protocol ({wire.clean(e, 300)})")
            raise SandboxError(f"the worker sent a reply corejax cannot read ({wire.clean(e, 300)}); it was "
                               "stopped, and a new one starts for the next call") from None

    # --- generation ----------------------------------------------------------------------------------------

    def _speculative(self, value: Any) -> SpeculativeConfig | None:
        """Validates a speculative= option; a draft model name becomes the path the worker loads."""
        spec = SpeculativeConfig.from_user(value)
        if spec is None or spec.draft_model is None:
            return spec
        path = str(hub.resolve(spec.draft_model, progress=self._progress).path)
        declared = getattr(self, "speculative", None)
        if getattr(self, "_client", None) is not None and self.sandbox and (
                declared is None or declared.draft_model != path):
            raise InvalidParameterError(
                f"draft_model {spec.draft_model!r} was not declared when this sandboxed Session started, so its "
                "worker may not read it; pass speculative={'method': 'draft', 'draft_model': ...} to Session()")
        return dataclasses.replace(spec, draft_model=path)

    def stream_chunks(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                      speculative: Any = SESSION_DEFAULT, **sampling: Any) -> Iterator[Chunk]:
        """Chunks with text, token ids and logprobs; the last one carries the GenerationResult. A chat may pass
        tools=[...] (OpenAI's tool objects), tool_choice ("auto", "none", "required" or {"type": "function",
        "function": {"name": ...}}) and parallel_tool_calls: a chunk then carries each call in tool_calls when it
        is complete (its text never shows in `text`), and the result has them in tool_calls with finish_reason
        "tool_calls". A thinking model's reasoning comes in Chunk.reasoning and result.reasoning_content."""
        return self._chunks(self._generation(prompt, messages, speculative, sampling))

    def _generation(self, prompt: str | None, messages: Sequence[dict] | None, speculative: Any,
                    sampling: dict[str, Any]) -> wire.Generate:
        """A GENERATE request, validated here before it is sent. A chat's tool keywords (tools, tool_choice,
        parallel_tool_calls) and the model's chat format decide its template input and how its reply is read."""
        tools = ToolRequest.pop(sampling)
        sp = SamplingParams.from_kwargs(**sampling)
        spec = self.speculative if speculative is SESSION_DEFAULT else self._speculative(speculative)
        check_prompt(prompt, messages)
        if messages is None:
            if tools is not None:
                raise InvalidParameterError("tools need a chat: pass messages=[...], not a prompt")
            return wire.Generate(prompt, None, sp, spec and spec.to_wire())
        chat = prepare_chat([dict(m) for m in messages], tools, self._chat_format(), sp)
        return wire.Generate(None, chat.messages, chat.sampling, spec and spec.to_wire(), chat.tools, chat)

    def _chat_format(self) -> ChatFormat:
        """How the model's chat template takes tools and writes calls (the worker's info says; read once)."""
        if self._format is None:
            self._format = ChatFormat.from_wire(self.info().get("chat_format"))
        return self._format

    def _chunks(self, msg: wire.Generate, cancel: Cancel | None = None) -> Iterator[Chunk]:
        parser = msg.reply.new_parser() if msg.reply is not None else None
        chunks = self._raw_chunks(msg, cancel)
        return chunks if parser is None else parse_chunks(chunks, parser)

    def _raw_chunks(self, msg: wire.Generate, cancel: Cancel | None = None) -> Iterator[Chunk]:
        for frame in self._frames(msg, cancel):
            if frame.kind == Kind.CHUNK:
                yield self._read(wire.chunk_from_wire, frame.payload)
            else:
                yield Chunk("", result=self._read(wire.read_result, Kind.GENERATE, frame.payload).result)

    def stream(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
               **sampling: Any) -> Iterator[str]:
        """Yields text pieces as they are generated (never half a UTF-8 character, never a stop string)."""
        for chunk in self.stream_chunks(prompt, messages=messages, **sampling):
            if chunk.text:
                yield chunk.text

    def generate(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                 **sampling: Any) -> GenerationResult:
        """Runs one request to completion. Sampling keywords: see corejax.SamplingParams."""
        result = None
        for chunk in self.stream_chunks(prompt, messages=messages, **sampling):
            result = chunk.result or result
        assert result is not None
        return result

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidParameterError(f"text must be a string; got {type(text).__name__}")
        return self._call(wire.Tokenize(text, bool(add_special))).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        import numpy as np

        return self._call(wire.Detokenize(np.asarray(list(ids), np.int64))).text

    # --- encoder tasks -------------------------------------------------------------------------------------

    def embed(self, texts: str | Sequence[str], *, truncate: bool = True) -> Any:
        """Sentence embeddings: float32 [n, D] for a list of n texts, [D] for one string (as
        sentence-transformers). Pooling and normalization follow the model's modules.json; texts longer than
        its max_seq_length are truncated, or rejected with InvalidParameterError when truncate=False."""
        import numpy as np

        if not isinstance(truncate, bool):
            raise InvalidParameterError(f"truncate must be True or False; got {truncate!r}")
        items = as_texts(texts)
        parts = [self._call(wire.Embed(batch, truncate)).embeddings for batch in text_batches(items)]
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out[0] if isinstance(texts, str) else out

    def classify(self, texts: str | Sequence[str], *, labels: Sequence[str] | None = None, head: Any = None,
                 multi_label: bool | None = None, template: str | None = None,
                 truncate: bool = True) -> Classification | list[Classification]:
        """Labels with scores, one Classification per text (a single one for a single string):
        - a *ForSequenceClassification model: its own head and id2label (softmax; sigmoid if multi-label);
        - an embedding model with head=(W [D, L], b [L]) and labels= (L names): a linear head over embeddings;
        - a generative model with labels=: zero-shot, each label scored by its likelihood as the answer to
          `template` (which holds {text} and may hold {labels})."""
        import numpy as np

        items = as_texts(texts)
        if labels is not None:
            if isinstance(labels, str) or not isinstance(labels, Sequence) or not all(
                    isinstance(x, str) and x for x in labels) or len(set(labels)) != len(labels):
                raise InvalidParameterError(f"labels must be a list of distinct, non-empty strings; got {labels!r}")
            labels = list(labels)
        if multi_label is not None and not isinstance(multi_label, bool):
            raise InvalidParameterError(f"multi_label must be True, False or None; got {multi_label!r}")
        if template is not None and (not isinstance(template, str) or "{text}" not in template):
            raise InvalidParameterError("template must be a string containing {text} (and may contain {labels})")
        if head is not None:
            try:
                w, b = head
                head = (np.asarray(w, np.float32), np.asarray(b, np.float32))
            except (TypeError, ValueError):
                raise InvalidParameterError("head must be a pair (W, b) of numeric arrays: W [dim, labels], "
                                            "b [labels]") from None
        results: list[Classification] = []
        for batch in text_batches(items):
            reply = self._call(wire.Classify(batch, labels, head, multi_label, template, bool(truncate)))
            names = reply.labels
            for row in reply.scores:
                best = int(row.argmax())
                results.append(Classification(names[best], float(row[best]),
                                              {n: float(v) for n, v in zip(names, row)}))
        return results[0] if isinstance(texts, str) else results

    def follow(self) -> None:
        """A follower of a cluster (process_id > 0): blocks while this process runs process 0's steps, and
        returns when process 0's Session closes (WorkerCrashed if this process's worker failed instead)."""
        if self.cluster is None or self.cluster.leader:
            raise InvalidParameterError("follow() is for processes 1.. of a cluster; process 0 takes requests")
        client = self._current_client()
        if client.proc is None:
            client._thread.join()
            return
        code = client.proc.wait()
        if code != 0:
            raise WorkerCrashed(f"this follower's worker exited with status {code}: {client.log_tail()}")

    def info(self) -> dict[str, Any]:
        return self._call(wire.Empty(Kind.INFO)).info

    def ping(self) -> None:
        """The empty request: a round trip through the worker's request loop (the benchmark measures it)."""
        self._call(wire.Empty(Kind.PING))

    def sandbox_report(self) -> dict[str, Any]:
        """Each layer of the worker's policy and whether it is engaged, plus the per-thread kernel state
        (NoNewPrivs, Seccomp) read from /proc by this process, which the worker cannot forge."""
        client = self._current_client()
        if not self.sandbox:
            return {"sandbox": False, "pid": None, "layers": [], "threads": None}
        return {"sandbox": True, "pid": client.pid, "layers": [dict(layer) for layer in client.report],
                "threads": thread_status(client.pid)}

    # --- lifetime ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the worker (requests still running fail with WorkerCrashed) and removes its temp folder; a kept
        worker (keep_alive) only loses this Session's connection, and its requests are cancelled."""
        with self._client_lock:
            self._closed = True
            client, self._client = self._client, None
        self._finalizer.detach()
        if client is not None:
            client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

def _close_client(holder: list) -> None:
    client = holder[0]
    if client is not None:
        client.close()
