"""Everything that runs where the model lives: prompt -> tokens -> engine -> text pieces, stop strings, results.

Session calls this in-process today; the sandbox issue runs the same object in the worker subprocess
behind the protocol, so nothing here may assume it shares memory with the caller.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from corejax.config import EncoderConfig, EngineConfig
from corejax.engine import Engine, StepTimes
from corejax.errors import InvalidParameterError, UnsupportedModelError
from corejax.hub import ModelSource, cache_dir
from corejax.loading.loader import LoadedModel, load_model
from corejax.results import Chunk, GenerationResult, Timings, TokenLogprob
from corejax.sampling import SamplingParams
from corejax.stopping import StopMatcher


def enable_compilation_cache() -> None:
    """XLA programs persist under the corejax cache, so a second start skips the first compile."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class Runtime:
    def __init__(self, source: ModelSource, *, weights: str | None = None,
                 engine: EngineConfig | None = None, progress: bool = True):
        enable_compilation_cache()
        self.model: LoadedModel = load_model(source, weights=weights, progress=progress)
        self.tokenizer = self.model.tokenizer
        self.encoder = None
        self.engine: Engine | None = None
        if isinstance(self.model.cfg, EncoderConfig):
            from corejax.encode import Encoder

            self.encoder = Encoder(self.model.cfg, self.model.params, self.tokenizer, self.model.sentence)
        else:
            self.engine = Engine(self.model.cfg, self.model.params, engine)

    def info(self) -> dict[str, Any]:
        if self.engine is None:
            return dict(self.model.info, load_seconds=self.model.load_seconds)
        ec = self.engine.engine_cfg
        return dict(self.model.info, load_seconds=self.model.load_seconds, kv_dtype=ec.kv_dtype,
                    kv_page_size=ec.page_size, kv_cache_bytes=self.engine.kv_cache_bytes,
                    kv_cache_tokens=(self.engine.allocator.num_pages - 1) * ec.page_size)

    def prompt_ids(self, prompt: str | None, messages: Sequence[dict] | None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidParameterError("give exactly one of prompt (a string) or messages (a list of dicts)")
        if messages is not None:
            if isinstance(messages, (str, bytes)) or not all(isinstance(m, dict) for m in messages):
                raise InvalidParameterError(
                    "messages must be a list of dicts like {'role': 'user', 'content': 'Hi'}")
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
            # The template writes BOS itself where the model wants it (HF tokenizes templates the same way).
            return self.tokenizer.encode(text, add_special=False)
        if not isinstance(prompt, str):
            raise InvalidParameterError(f"prompt must be a string; got {type(prompt).__name__}")
        return self.tokenizer.encode(prompt, add_special=True)

    def stream(self, prompt: str | None, messages: Sequence[dict] | None, sp: SamplingParams) -> Iterator[Chunk]:
        """Yields text chunks as tokens arrive; the final chunk carries the GenerationResult."""
        if self.engine is None:
            raise UnsupportedModelError(
                f"{self.model.info.get('name')} is an encoder: it embeds and classifies but cannot generate text; "
                "use embed()/classify(), or a generative model for generate()")
        start = time.perf_counter()
        ids = self.prompt_ids(prompt, messages)
        self.engine.check_fits(len(ids))
        detok = self.tokenizer.stream(continuation=True)  # keep the SPM space before the first new word
        stops = StopMatcher(sp.stop)
        times = StepTimes()
        generated: list[int] = []
        logprobs: list[TokenLogprob] = []
        text_parts: list[str] = []
        finish = "length"
        steps = self.engine.generate(ids, sp, self.tokenizer.eos_ids, times)
        try:
            for event in steps:
                generated.append(event.token)
                lp = ()
                if event.logprob is not None:
                    lp = (TokenLogprob(event.token, self.tokenizer.decode([event.token], skip_special=False),
                                       event.logprob, tuple(event.top_logprobs or ())),)
                    logprobs.extend(lp)
                if event.token in self.tokenizer.eos_ids and not sp.ignore_eos:
                    finish = "stop"
                    break
                text, hit = stops.push(detok.push(event.token))
                if text or lp:
                    text_parts.append(text)
                    yield Chunk(text, (event.token,), lp)
                if hit:
                    finish = "stop"
                    break
        finally:
            steps.close()
        if not stops.stopped:  # release what the detokenizer and the stop matcher still hold
            tail, hit = stops.push(detok.flush())
            if hit:
                finish = "stop"
            else:
                tail += stops.flush()
            if tail:
                text_parts.append(tail)
                yield Chunk(tail)
        yield Chunk("", result=self._result(ids, generated, "".join(text_parts), finish, logprobs, sp, times,
                                            start))

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
