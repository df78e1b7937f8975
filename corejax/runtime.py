"""Everything that runs where the model lives: prompt -> tokens -> engine -> text pieces, stop strings, results.

It runs in the worker (corejax/sandbox/worker.py), a sandboxed subprocess or a thread of the caller's process
(sandbox=False), behind the protocol: nothing here may assume it shares memory with the caller.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from corejax import distributed, memory
from corejax.config import EncoderConfig, EngineConfig, ModelConfig
from corejax.engine import Engine
from corejax.errors import InvalidParameterError, UnsupportedModelError
from corejax.options import check_prompt
from corejax.filter import FINISH_REASON as FILTERED
from corejax.filter import Blocklist
from corejax.hostmem import trim_heap
from corejax.hub import ModelSource
from corejax.kernels import ffi
from corejax.loading.gguf import reuse_headers
from corejax.loading.loader import (
    ENCODER_MATRICES,
    LoadedModel,
    block_params,
    default_weights,
    load_model,
    plan_weights,
)
from corejax.models.stack import stack_layers
from corejax.paths import cache_dir
from corejax.requests import StepTimes
from corejax.results import Chunk, GenerationResult, Timings, TokenLogprob
from corejax.options import SamplingParams
from corejax.scheduler import Scheduler
from corejax.speculative import DraftModelProposer, SpeculativeConfig
from corejax.stopping import StopMatcher
from corejax.structured import Constraint, GrammarVocab, Matcher

_SCHEDULER_LOCK = threading.Lock()
_TOKENIZER_PROBES = ("Hello, world! 123", " def f(x):\n\treturn x ** 2", "naïve café — ünïcode ✓")


def enable_compilation_cache() -> None:
    """XLA programs persist under the corejax cache, so a second start skips the first compile. One folder per
    native-kernel build (ffi.library_key): a cached program calls the kernels by name, so a program compiled
    against one build must never run against another."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla" / ffi.library_key()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _prepare_decoder(params: dict, native: bool) -> dict:
    """Float matmuls in the native kernel's column blocks (kernels/small_matmul.cc) when it is loaded, then the
    layers stacked for the layer loop (models/stack.py); each step frees what it converted, never two copies."""
    if native:
        params = block_params(params)
    params = stack_layers(params, free=True)
    trim_heap()  # the per-layer arrays just freed, back to the system
    return params


class _TextOut:
    """A generation's text on its way out: stop strings cut it (corejax/stopping.py), then the output filter
    checks it (corejax/filter.py). push/finish return (text to emit, the finish reason once it ended)."""

    def __init__(self, stop: Sequence[str], output_filter: Blocklist | None):
        self.stops = StopMatcher(stop)
        self.filter = output_filter.stream() if output_filter is not None else None
        self.ended: str | None = None

    def push(self, piece: str) -> tuple[str, str | None]:
        text, stopped = self.stops.push(piece)
        return self._filtered(text, "stop" if stopped else None)

    def finish(self, piece: str) -> tuple[str, str | None]:
        """The last piece (what the detokenizer held): everything still held is released or cut."""
        text, stopped = self.stops.push(piece)
        if not stopped:
            text += self.stops.flush()
        return self._filtered(text, "stop" if stopped else "", final=True)

    def _filtered(self, text: str, stopped: str | None, final: bool = False) -> tuple[str, str | None]:
        if self.filter is not None:
            text, blocked = self.filter.push(text)
            if not blocked and (stopped is not None or final):  # the text ends here: nothing more may complete
                tail, blocked = self.filter.flush()
                text += tail
            if blocked:
                stopped = FILTERED
        self.ended = stopped or None
        return text, self.ended


class Runtime:
    def __init__(self, source: ModelSource, *, weights: str | None = None,
                 engine: EngineConfig | None = None, progress: bool | Callable[[str, int, int], None] = True,
                 memory_limit: int | str | None = None, output_filter: Blocklist | None = None):
        native = ffi.ensure() and ffi.available()  # the native CPU kernels (kernels/*.cc): one-device processes
        enable_compilation_cache()
        self.source = source
        self.output_filter = output_filter  # checked on every generation's text (corejax/filter.py)
        self._scheduler: Scheduler | None = None
        self._tagged: dict[Any, Any] = {}  # stream(tag=...) -> its scheduler Request, for cancel()
        self._grammar_vocab: GrammarVocab | None = None  # built by the first structured-output request
        self._grammar_lock = threading.Lock()
        # Weights, KV pool and workspace are reserved from the file's headers before any is allocated, so a
        # model that cannot fit memory_limit fails here with MemoryBudgetError, having allocated nothing.
        self.budget = memory.MemoryBudget(memory_limit)
        engine = engine or EngineConfig()
        if distributed.joined() is not None and engine.devices == 1:  # a cluster's model spans all its devices
            import jax

            engine = dataclasses.replace(engine, devices=jax.device_count())
        with reuse_headers():  # one parse of the file's header for the four reads below
            weights = weights or default_weights(source, ffi.fast_quant(), ffi.bf16_dot(), native)
            engine = memory.admit(self.budget, plan_weights(source, weights), engine, source.name)
            self.model: LoadedModel = load_model(source, weights=weights, progress=progress)
        memory.loaded(self.budget, self.model.info["weight_bytes"])
        memory.reserve_serving(self.budget)  # the KV pool and workspace admit() planned
        self.tokenizer = self.model.tokenizer
        self.encoder = None
        self.engine: Engine | None = None
        if isinstance(self.model.cfg, EncoderConfig):
            from corejax.encode import Encoder

            if native:  # float matmuls on the native kernel, padding tokens skipped (kernels/small_matmul.cc)
                self.model.params = block_params(self.model.params, ENCODER_MATRICES)
            self.encoder = Encoder(self.model.cfg, self.model.params, self.tokenizer, self.model.sentence)
        else:
            self.model.params = _prepare_decoder(self.model.params, native)
            self.engine = Engine(self.model.cfg, self.model.params, engine)
        self.cluster = distributed.joined()
        if self.cluster is not None and self.engine is None:
            raise UnsupportedModelError("several processes serve generative models only; run an encoder "
                                        "(embeddings, classification) in one process")

    @property
    def follower(self) -> bool:
        """One process of a cluster that runs the leader's steps and takes no requests of its own."""
        return self.cluster is not None and not self.cluster.leader

    def follow(self) -> int:
        """A follower's whole life: the leader's program calls, until the leader leaves (their count)."""
        return self.engine.follow()

    def warmup(self, report: Callable[[str, int, int], None] | None = None) -> None:
        """Compiles what a first short request with default sampling runs (the smallest prefill bucket and the
        one-row decode step), so the first user request finds them ready; a second start of the same model
        loads them from the persistent compilation cache in a fraction of the time."""
        if self.engine is None:
            return
        if report is not None:
            report("compiling", 0, 1)
        # Default sampling, default max_tokens: the same static flags and page-table width as a default request.
        chunks = self.stream("Hello", None, SamplingParams(ignore_eos=True))
        for i, _ in enumerate(chunks):
            if i >= 2:  # the prefill program and the decode step have both run
                break
        chunks.close()
        if report is not None:
            report("compiling", 1, 1)

    def info(self) -> dict[str, Any]:
        if self.engine is None:
            return dict(self.model.info, load_seconds=self.model.load_seconds, memory=self.budget.report(),
                        native_kernels=ffi.available(), kernel_isa=ffi.isa())
        ec = self.engine.engine_cfg
        alloc = self.engine.allocator
        waiting, running = self._scheduler.load() if self._scheduler is not None else (0, 0)
        return dict(self.model.info, load_seconds=self.model.load_seconds, memory=self.budget.report(),
                    native_kernels=ffi.available(), kernel_isa=ffi.isa(), kv_dtype=ec.kv_dtype,
                    kv_page_size=ec.page_size, kv_cache_bytes=self.engine.kv_cache_bytes,
                    kv_cache_tokens=(alloc.num_pages - 1) * ec.page_size,
                    # Load now: pages held by requests (cached prefixes nobody uses count as free), and requests.
                    kv_pages_total=alloc.num_pages - 1, kv_pages_in_use=alloc.num_pages - 1 - alloc.num_available,
                    requests_waiting=waiting, requests_running=running)

    def matcher(self, constraint: Constraint | None) -> Matcher | None:
        """A request's grammar state over this model's vocabulary (corejax/structured.py); the vocabulary is
        read once, on the first constrained request (about a second for a 262k-token vocabulary)."""
        if constraint is None:
            return None
        with self._grammar_lock:
            if self._grammar_vocab is None:
                self._grammar_vocab = GrammarVocab(self.tokenizer, self.model.cfg.vocab_size)
        return self._grammar_vocab.matcher(constraint)

    def prompt_ids(self, prompt: str | None, messages: Sequence[dict] | None) -> list[int]:
        check_prompt(prompt, messages)
        if messages is not None:
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
            # The template writes BOS itself where the model wants it (HF tokenizes templates the same way).
            return self.tokenizer.encode(text, add_special=False)
        return self.tokenizer.encode(prompt, add_special=True)

    @property
    def scheduler(self) -> Scheduler:
        """The continuous-batching loop over the engine (started with the first request)."""
        with _SCHEDULER_LOCK:
            if self._scheduler is None:
                self._scheduler = Scheduler(self.engine, draft_loader=self._load_draft)
            return self._scheduler

    def _load_draft(self, spec: SpeculativeConfig) -> DraftModelProposer:
        """The draft model of speculative={"method": "draft", ...}: loaded once per (model, weights)."""
        from corejax.hub import resolve

        # In a sandboxed worker draft_model is a path the Session resolved and allowed the worker to read.
        source = resolve(spec.draft_model, pull=False) if spec.draft_model is not None else self.source
        plan = plan_weights(source, spec.draft_weights)
        kv = memory.kv_pool_bytes(self.engine.engine_cfg, plan.cfg) if isinstance(plan.cfg, ModelConfig) else 0
        self.budget.reserve(f"draft {source.name}", plan.weight_bytes + kv,  # before anything is allocated
                            f"speculative draft: weights {plan.weights} + its KV pool",
                            hint="Use a smaller draft model, draft_weights='int8', or raise memory_limit.",
                            what=f"adding the draft model {source.name}")
        draft = load_model(source, weights=spec.draft_weights, progress=False)
        if isinstance(draft.cfg, EncoderConfig) or draft.cfg.vocab_size != self.model.cfg.vocab_size or any(
                draft.tokenizer.encode(t) != self.tokenizer.encode(t) for t in _TOKENIZER_PROBES):
            raise InvalidParameterError(
                f"the draft model {source.name} does not share {self.model.info.get('name')}'s tokenizer; "
                "speculative decoding needs a draft with the same vocabulary")
        draft.params = _prepare_decoder(draft.params, ffi.available())
        return DraftModelProposer(Engine(draft.cfg, draft.params, self.engine.engine_cfg))

    def cancel(self, tag: Any) -> None:
        """Cancels the generation started with stream(..., tag=tag), if it is still queued or running."""
        req = self._tagged.get(tag)
        if req is not None:
            req.close()

    def stream(self, prompt: str | None, messages: Sequence[dict] | None, sp: SamplingParams,
               speculative: Any = None, tag: Any = None) -> Iterator[Chunk]:
        """Yields text chunks as tokens arrive; the final chunk carries the GenerationResult.

        Runs as one request of the scheduler's batch: other streams may share every decode step. `tag`
        names the request for cancel(); closing the iterator cancels it too."""
        if self.follower:
            raise InvalidParameterError(f"process {self.cluster.process_id} of the cluster follows process 0: "
                                        "send requests to process 0")
        if self.engine is None:
            raise UnsupportedModelError(
                f"{self.model.info.get('name')} is an encoder: it embeds and classifies but cannot generate text; "
                "use embed()/classify(), or a generative model for generate()")
        start = time.perf_counter()
        spec = SpeculativeConfig.from_user(speculative)
        ids = self.prompt_ids(prompt, messages)
        detok = self.tokenizer.stream(continuation=True)  # keep the SPM space before the first new word
        text_out = _TextOut(sp.stop, self.output_filter)
        generated: list[int] = []
        logprobs: list[TokenLogprob] = []
        text_parts: list[str] = []
        finish = "length"
        steps = self.scheduler.submit(ids, sp, self.tokenizer.eos_ids, spec, self.matcher(sp.constraint))
        times = steps.times
        if tag is not None:
            self._tagged[tag] = steps
        try:
            for event in steps:
                generated.append(event.token)
                lp = ()
                if event.logprob is not None:
                    lp = (self._logprob(event),)
                    logprobs.extend(lp)
                if event.token in self.tokenizer.eos_ids and not sp.ignore_eos:
                    finish = "stop"
                    break
                text, ended = text_out.push(detok.push(event.token))
                if text or lp:
                    text_parts.append(text)
                    yield Chunk(text, (event.token,), lp)
                if ended:
                    finish = ended
                    break
        finally:
            steps.close()
            self._tagged.pop(tag, None)
        if steps.finish_reason is not None and finish == "length":  # the grammar ended it (structured output)
            finish = steps.finish_reason
        if not text_out.ended:  # release what the detokenizer, the stop matcher and the filter still hold
            tail, ended = text_out.finish(detok.flush())
            finish = ended or finish
            if tail:
                text_parts.append(tail)
                yield Chunk(tail)
        yield Chunk("", result=self._result(ids, generated, "".join(text_parts), finish, logprobs, sp, times,
                                            start))

    def _logprob(self, event: Any) -> TokenLogprob:
        def piece(token: int) -> str:
            return self.tokenizer.decode([token], skip_special=False)

        top = tuple(event.top_logprobs or ())
        return TokenLogprob(event.token, piece(event.token), event.logprob, top, tuple(piece(t) for t, _ in top))

    def _result(self, ids, generated, text, finish, logprobs, sp, times: StepTimes, start) -> GenerationResult:
        ttft = max(times.first_token - start, 1e-9) if times.generated else 0.0
        decode_s = times.last_token - times.first_token
        timings = Timings(
            load_s=self.model.load_seconds,
            prompt_tokens=len(ids),
            cached_prompt_tokens=times.cached_tokens,
            generated_tokens=len(generated),
            time_to_first_token_s=ttft,
            prefill_tokens_per_s=(len(ids) - times.cached_tokens) / ttft if ttft else 0.0,
            decode_tokens_per_s=(times.generated - 1) / decode_s if decode_s > 0 else 0.0,
            total_s=time.perf_counter() - start,
            draft_tokens=times.drafted,
            accepted_draft_tokens=times.accepted,
            preemptions=times.preempted,
            mask_s=times.mask_s,
        )
        return GenerationResult(text, tuple(generated), finish, tuple(ids), timings,
                                tuple(logprobs) if sp.logprobs is not None else None)

    # --- encoder tasks -------------------------------------------------------------------------------------

    def embed(self, texts: list[str], truncate: bool = True) -> np.ndarray:
        """[n, D] float32 sentence embeddings (pooling and normalization from the model's modules.json)."""
        if self.encoder is None:
            raise UnsupportedModelError(
                f"{self.model.info.get('name')} is a generative model; embed() needs an encoder such as "
                "all-minilm-l6-v2 (corejax.embed(texts, model='all-minilm-l6-v2'))")
        return self.encoder.embed(texts, truncate)

    def classify(self, texts: list[str], labels: list[str] | None, head: Any = None, multi_label: bool | None = None,
                 template: str | None = None, truncate: bool = True) -> tuple[list[str], np.ndarray]:
        """-> (labels, scores [n, L]): an encoder's own head, an embedding model plus head=(W, b), or
        zero-shot with a generative model (each label scored by its likelihood after a prompt)."""
        if self.encoder is not None:
            if template is not None:
                raise InvalidParameterError("template= is for zero-shot with a generative model; an encoder "
                                            "classifies with its own head or head=(W, b)")
            return self.encoder.classify(texts, labels, head, multi_label, truncate)
        if head is not None:
            raise InvalidParameterError("head=(W, b) needs an embedding model (e.g. all-minilm-l6-v2); a generative "
                                        "model classifies zero-shot from labels= alone")
        from corejax.zeroshot import zero_shot_scores

        return zero_shot_scores(self.engine, self.tokenizer, texts, labels, template, bool(multi_label))
