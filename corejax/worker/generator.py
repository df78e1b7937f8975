"""A decoder's runtime in the worker: prompt -> tokens -> the scheduler's batched steps -> text pieces, stop strings
and the output filter, results and timings; speculative decoding's draft models, structured output's grammar
vocabulary, zero-shot classification. worker/start.py opens it; nothing here may assume it shares memory with
the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from corejax.engine import distributed
from corejax.errors import CorejaxError, InvalidParameterError
from corejax.hostmem import trim_heap
from corejax.hub import ModelSource
from corejax.kernels.policy import Kernels
from corejax.loading.loader import LoadedModel, block_params, load_model, plan_weights
from corejax.models.stack import stack_layers
from corejax.serving.requests import StepTimes
from corejax.serving.runner import ModelRunner
from corejax.serving.scheduler import Scheduler
from corejax.serving.speculative import DraftModelProposer
from corejax.serving.stopping import StopMatcher
from corejax.serving.structured import GrammarVocab, Matcher
from corejax.tools.formats import detect as detect_chat_format
from corejax.types.config import EncoderConfig, EngineConfig, ModelConfig
from corejax.types.constraints import Constraint
from corejax.types.filter import FINISH_REASON as FILTERED
from corejax.types.filter import Blocklist
from corejax.types.options import SamplingParams, SpeculativeConfig, check_logit_bias, check_prompt
from corejax.types.results import Chunk, GenerationResult, Timings, TokenLogprob
from corejax.worker import memory
from corejax.worker.runtime import Runtime

_SCHEDULER_LOCK = threading.Lock()
_TOKENIZER_PROBES = ("Hello, world! 123", " def f(x):\n\treturn x ** 2", "naïve café — ünïcode ✓")


def prepare_decoder(params: dict, kernels: Kernels) -> dict:
    """Float matmuls in the native kernel's column blocks (kernels/small_matmul.cc) where the policy runs it, then
    the layers stacked for the layer loop (models/stack.py); each step frees what it converted, never two copies."""
    if kernels.native:
        params = block_params(params, kernels)
    params = stack_layers(params, free=True)
    trim_heap()  # the per-layer arrays just freed, back to the system
    return params


class _TextOut:
    """A generation's text on its way out: stop strings cut it (corejax/serving/stopping.py), then the output filter
    checks it (corejax/types/filter.py). push/finish return (text to emit, the finish reason once it ended)."""

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


class Generator(Runtime):
    """A decoder's runtime: its ModelRunner (params, KV pages, programs), the scheduler that batches every request
    over it, the tokenizer's text on the way out (stop strings, the output filter), speculative decoding's draft
    models, structured output's grammar vocabulary, zero-shot classification."""

    def __init__(self, source: ModelSource, model: LoadedModel, budget: memory.MemoryBudget, kernels: Kernels,
                 engine: EngineConfig, output_filter: Blocklist | None = None):
        super().__init__(source, model, budget, kernels)
        self.output_filter = output_filter  # checked on every generation's text (corejax/types/filter.py)
        self._scheduler: Scheduler | None = None
        self._tagged: dict[Any, Any] = {}  # stream(tag=...) -> its scheduler Request, for cancel()
        self._grammar_vocab: GrammarVocab | None = None  # built by the first structured-output request
        self._grammar_lock = threading.Lock()
        self._chat_format: dict | None = None
        self.model.params = prepare_decoder(self.model.params, kernels)
        self.runner = ModelRunner(self.model.cfg, self.model.params, engine, kernels)
        self.cluster = distributed.joined()

    @property
    def follower(self) -> bool:
        """One process of a cluster that runs the leader's steps and takes no requests of its own."""
        return self.cluster is not None and not self.cluster.leader

    def follow(self) -> int:
        """A follower's whole life: the leader's program calls, until the leader leaves (their count)."""
        return self.runner.follow()

    def warmup(self, report: Callable[[str, int, int], None] | None = None, batches: bool = False) -> None:
        """Compiles what a first short request with default sampling runs (the smallest prefill bucket and the
        one-row decode step), so the first user request finds them ready; a second start of the same model
        loads them from the persistent compilation cache in a fraction of the time. batches: also every batch
        and chunk bucket a burst of streams meets (ModelRunner.batch_shapes), so streams joining and leaving a
        server's batch never wait for a compile."""
        if self.cluster is not None:
            return  # a cluster's processes compile together, on the leader's first steps (a follower cannot stream)
        shapes = self.runner.batch_shapes(self.scheduler_max_batch) if batches else []
        total = len(shapes) + 1
        if report is not None:
            report("compiling", 0, total)
        for i, shape in enumerate(shapes):
            self.runner.warm(shape, SamplingParams(ignore_eos=True))
            if report is not None:
                report("compiling", i + 1, total)
        # Default sampling, default max_tokens: the same static flags and page-table width as a default request.
        chunks = self.stream("Hello", None, SamplingParams(ignore_eos=True))
        for i, _ in enumerate(chunks):
            if i >= 2:  # the prefill program and the decode step have both run
                break
        chunks.close()
        if report is not None:
            report("compiling", total, total)

    def info(self) -> dict[str, Any]:
        ec, alloc = self.runner.engine_cfg, self.runner.allocator
        waiting, running = self._scheduler.load() if self._scheduler is not None else (0, 0)
        return dict(super().info(), kv_dtype=ec.kv_dtype, kv_page_size=ec.page_size,
                    kv_cache_bytes=self.runner.kv_cache_bytes, kv_cache_tokens=(alloc.num_pages - 1) * ec.page_size,
                    # Load now: pages held by requests (cached prefixes nobody uses count as free), and requests.
                    kv_pages_total=alloc.num_pages - 1, kv_pages_in_use=alloc.num_pages - 1 - alloc.num_available,
                    requests_waiting=waiting, requests_running=running,
                    chat_format=self.chat_format())

    def chat_format(self) -> dict:
        """How the chat template takes tools and writes calls and reasoning (corejax/tools/formats.py), for the
        parent, which parses replies; read once."""
        if self._chat_format is None:
            template, prompt = self.tokenizer.chat_template, None
            if template:
                try:
                    prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
                except CorejaxError:  # a template that wants another conversation, or is broken: no matter here
                    pass
            self._chat_format = detect_chat_format(template, prompt).to_wire()
        return self._chat_format

    def matcher(self, constraint: Constraint | None) -> Matcher | None:
        """A request's grammar state over this model's vocabulary (corejax/serving/structured.py); the vocabulary is
        read once, on the first constrained request (about a second for a 262k-token vocabulary)."""
        if constraint is None:
            return None
        with self._grammar_lock:
            if self._grammar_vocab is None:
                self._grammar_vocab = GrammarVocab(self.tokenizer, self.model.cfg.vocab_size)
        return self._grammar_vocab.matcher(constraint)

    def prompt_ids(self, prompt: str | None, messages: Sequence[dict] | None,
                   tools: list[dict] | None = None) -> list[int]:
        check_prompt(prompt, messages)
        if tools is not None and messages is None:
            raise InvalidParameterError("tools need a chat (messages=...): the chat template renders them")
        if messages is not None:
            extra = {} if tools is None else {"tools": list(tools)}
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, **extra)
            # The template writes BOS itself where the model wants it (HF tokenizes templates the same way).
            return self.tokenizer.encode(text, add_special=False)
        return self.tokenizer.encode(prompt, add_special=True)

    scheduler_max_batch = 16  # rows one step carries (Scheduler's max_batch)

    @property
    def scheduler(self) -> Scheduler:
        """The continuous-batching loop over the engine (started with the first request)."""
        with _SCHEDULER_LOCK:
            if self._scheduler is None:
                self._scheduler = Scheduler(self.runner, max_batch=self.scheduler_max_batch,
                                            draft_loader=self._load_draft)
            return self._scheduler

    def _load_draft(self, spec: SpeculativeConfig) -> DraftModelProposer:
        """The draft model of speculative={"method": "draft", ...}: loaded once per (model, weights)."""
        from corejax.hub import resolve

        # In a sandboxed worker draft_model is a path the Session resolved and allowed the worker to read.
        source = resolve(spec.draft_model, pull=False) if spec.draft_model is not None else self.source
        plan = plan_weights(source, spec.draft_weights)
        kv = memory.kv_pool_bytes(self.runner.engine_cfg, plan.cfg) if isinstance(plan.cfg, ModelConfig) else 0
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
        draft.params = prepare_decoder(draft.params, self.kernels)
        return DraftModelProposer(ModelRunner(draft.cfg, draft.params, self.runner.engine_cfg, self.kernels))

    def cancel(self, tag: Any) -> None:
        """Cancels the generation started with stream(..., tag=tag), if it is still queued or running."""
        req = self._tagged.get(tag)
        if req is not None:
            req.close()

    def stream(self, prompt: str | None, messages: Sequence[dict] | None, sp: SamplingParams,
               speculative: Any = None, tag: Any = None, tools: list[dict] | None = None) -> Iterator[Chunk]:
        """Yields text chunks as tokens arrive; the final chunk carries the GenerationResult.

        Runs as one request of the scheduler's batch: other streams may share every decode step. `tag`
        names the request for cancel(); closing the iterator cancels it too."""
        if self.follower:
            raise InvalidParameterError(f"process {self.cluster.process_id} of the cluster follows process 0: "
                                        "send requests to process 0")
        start = time.perf_counter()
        spec = SpeculativeConfig.from_user(speculative)
        check_logit_bias(sp, self.model.cfg.vocab_size, self.name)
        ids = self.prompt_ids(prompt, messages, tools)
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

    # --- classification ----------------------------------------------------------------------------------

    def classify(self, texts: list[str], labels: list[str] | None, head: Any = None, multi_label: bool | None = None,
                 template: str | None = None, truncate: bool = True) -> tuple[list[str], np.ndarray]:
        """Zero-shot: each label scored by its likelihood after a prompt (corejax/serving/zeroshot.py)."""
        if head is not None:
            raise InvalidParameterError("head=(W, b) needs an embedding model (e.g. all-minilm-l6-v2); a generative "
                                        "model classifies zero-shot from labels= alone")
        from corejax.serving.zeroshot import zero_shot_scores

        return zero_shot_scores(self.runner, self.tokenizer, texts, labels, template, bool(multi_label))
