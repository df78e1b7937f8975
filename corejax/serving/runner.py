"""The model runners: the only callers of the compiled programs (corejax/engine/programs.py).

A ModelRunner holds one decoder's params, its KV page pool and the host allocator that assigns the pages, and
runs the programs over them: the scheduler, the draft-model proposer and zero-shot scoring hand it host batches
(serving/batch.py StepBatch, engine/sampling.py SamplingBatch) and get the step's outputs; nobody else touches
the pool. Pages of finished requests stay cached, so a prompt that starts like an earlier one reuses that KV
(prefix caching). An EncoderRunner does the same for an encoder, which has no cache.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from corejax.engine import distributed, sharding
from corejax.engine.cache import PagedKVCache
from corejax.kernels.policy import Kernels
from corejax.engine.programs import Programs
from corejax.engine.sampling import SampleOutput, SamplingBatch
from corejax.errors import ContextLengthError, InvalidParameterError
from corejax.models.stack import stack_layers
from corejax.serving.batch import MIN_PREFILL_BUCKET, MIN_TABLE_PAGES, StepBatch, bucket
from corejax.serving.paging import PageAllocator
from corejax.types.config import EncoderConfig, EngineConfig, ModelConfig
from corejax.types.options import SamplingParams


BURST_TOKENS = 128  # batch_shapes: the longest prompt chunk warmed at every row bucket


class ModelRunner:
    """One decoder: params, KV page pool, page allocator, and its own compiled programs (freed with it)."""

    def __init__(self, cfg: ModelConfig, params: Any, engine_cfg: EngineConfig | None = None,
                 kernels: Kernels | None = None):
        self.cfg = cfg
        self.kernels = kernels if kernels is not None else Kernels.detect()
        # Layers stacked (models/stack.py) so each program holds one compiled layer run in a loop; a caller's
        # list of per-layer dicts is copied, not consumed (Runtime stacks its own params in place first).
        self.params = stack_layers(params)
        self.engine_cfg = engine_cfg or EngineConfig()
        ec = self.engine_cfg
        kv_place = None
        self.mesh = None
        if ec.devices > 1:  # tensor-parallel: the same programs, partitioned by XLA (corejax/engine/sharding.py)
            self.mesh = sharding.make_mesh(ec.devices)
            self.params = sharding.shard_decoder(self.params, cfg, self.mesh)
            kv_place = NamedSharding(self.mesh, sharding.kv_spec(cfg, ec.devices))
        num_pages = ec.num_pages(cfg)
        self.allocator = PageAllocator(num_pages, ec.page_size)
        self.cache = PagedKVCache.create(cfg, num_pages, ec.page_size, ec.kv_dtype, kv_place, self.kernels)
        # Where the native kernel reads the pages (float pages), it stops at each row's length, so every batch can
        # carry the widest page table a sequence can use: the width then never makes a program of its own, and a
        # warm-up's decode step is every later request's (the other path gathers whole tables: widths bucketed).
        self.table_pages: int | None = None
        if self.kernels.native and ec.devices == 1 and self.cache.k_pages.dtype in (jnp.float32, jnp.bfloat16,
                                                                                     jnp.uint16):
            self.table_pages = bucket(min(-(-cfg.max_context // ec.page_size), num_pages), MIN_TABLE_PAGES)
        self.programs: Any = Programs()
        cluster = distributed.joined()
        if cluster is not None:  # one process of several (corejax/engine/distributed.py)
            if ec.devices != jax.device_count():
                raise InvalidParameterError(
                    f"a model served by {cluster.num_processes} processes spans all {jax.device_count()} devices "
                    f"of the cluster; got devices={ec.devices}")
            if cluster.leader:  # every program call is published to the followers, then run
                self.programs = distributed.Leader(self.programs, self.params, self.cache, cfg)

    # --- the programs --------------------------------------------------------------------------------------

    def prefill(self, batch: StepBatch, sampling: SamplingBatch | None = None,
                mask: np.ndarray | None = None, *, compile_only: bool = False) -> SampleOutput | None:
        """One prompt chunk per row written to the cache; with `sampling` (rows whose prompt it finishes), the
        first new token sampled from each row's last position, under the token bitmask `mask` [B, W].
        compile_only: build (or load) the call's program and run nothing."""
        extra = {} if sampling is None else dict(sampling=sampling.tensors, keys=sampling.keys,
                                                 penalties=sampling.penalties, mask=mask)
        args = (self.params, batch.tokens, batch.positions, batch.last, batch.cache(self.cache))
        kwargs = dict(cfg=self.cfg, kernels=self.kernels, **extra)
        if compile_only:
            self.programs.prefill.lower(*args, **kwargs).compile()
            return None
        out, self.cache = self.programs.prefill(*args, **kwargs)
        return out

    def decode(self, batch: StepBatch, sampling: SamplingBatch, steps: np.ndarray,
               mask: np.ndarray | None = None, *, compile_only: bool = False) -> SampleOutput | None:
        """One decode step ([B, T]: each row's last token, then its drafts); the sampling batch's penalty state
        is updated on the device. compile_only: build (or load) the step's program and run nothing."""
        args = (self.params, batch.tokens, batch.positions, batch.cache(self.cache), sampling.tensors,
                sampling.penalties, sampling.keys, steps)
        kwargs = dict(cfg=self.cfg, kernels=self.kernels, mask=mask)
        if compile_only:
            self.programs.decode_step.lower(*args, **kwargs).compile()
            return None
        out, self.cache, sampling.penalties = self.programs.decode_step(*args, **kwargs)
        return out

    def copy_pages(self, copies: Any) -> None:
        """Copy-on-write (serving/paging.py PageCopy): each shared page about to change gets a private copy."""
        for c in copies:
            self.cache = self.programs.copy_page(self.cache, np.int32(c.src), np.int32(c.dst))

    def token_logprobs(self, tokens: np.ndarray) -> np.ndarray:
        """tokens [B, T] -> [B, T - 1] log p(tokens[:, t + 1] | tokens[:, :t + 1]) from a fresh forward."""
        return np.asarray(self.programs.token_logprobs(self.params, tokens, cfg=self.cfg, kernels=self.kernels))

    def full_logits(self, tokens: np.ndarray) -> jax.Array:
        """tokens [B, T] -> logits [B, T, V] from a fresh forward (tests, scoring)."""
        return self.programs.full_logits(self.params, tokens, cfg=self.cfg, kernels=self.kernels)

    def batch_shapes(self, max_batch: int) -> list[tuple[str, int, int]]:
        """The calls a burst of streams meets, as (program, rows, tokens) buckets: the decode step at every row
        bucket up to max_batch; the prefill call that finishes prompts at every row bucket for prompts of up to
        128 tokens (a burst of chat turns is one such call) and at one row for every chunk size; a long prompt's
        middle chunk (no sampling) at every chunk size the pacer (pacing.py) gives while others decode. Empty
        where page-table widths depend on the request (the non-native attention path): those cannot be known
        ahead."""
        if self.table_pages is None:
            return []
        rows = [1 << i for i in range(max(1, max_batch).bit_length())]
        chunks = [t for t in (1 << i for i in range(4, 16)) if t <= max(self.engine_cfg.prefill_chunk, 16)]
        shapes = [("decode", b, 1) for b in rows]
        shapes += [("prefill", b, t) for t in chunks if t <= BURST_TOKENS for b in rows]
        shapes += [("prefill", 1, t) for t in chunks if t > BURST_TOKENS]
        shapes += [("prefill_part", 1, t) for t in chunks if t > MIN_PREFILL_BUCKET]
        return shapes

    def warm(self, shape: tuple[str, int, int], sp: SamplingParams) -> None:
        """Builds (or loads from the persistent cache) the program of one call of `shape` (batch_shapes) without
        running it, on the arguments a batch of that shape with `sp`'s sampling flags passes, so a request finds
        it ready. (JAX keeps an ahead-of-time compile for the jitted function's later calls.)"""
        kind, b, t = shape
        zeros = np.zeros((b, t), np.int32)
        batch = StepBatch(zeros, zeros, np.zeros((b,), np.int32), np.zeros((b,), np.int32),
                          np.zeros((b, self.table_pages), np.int32), 0)
        sampling = SamplingBatch.build([sp] * b, [], [((), ())] * b, b, self.cfg.vocab_size)
        if kind == "decode":
            self.decode(batch, sampling, np.zeros((b,), np.int32), compile_only=True)
        else:
            self.prefill(batch, sampling if kind == "prefill" else None, compile_only=True)

    # --- the pool ------------------------------------------------------------------------------------------

    def follow(self) -> int:
        """A follower of a cluster: runs the leader's program calls on this process's shards until it leaves."""
        cache, self.cache = self.cache, None
        return distributed.follow(self.programs, self.params, cache, self.cfg)

    @property
    def kv_cache_bytes(self) -> int:
        leaves = jax.tree_util.tree_leaves((self.cache.k_pages, self.cache.v_pages, self.cache.k_scales,
                                            self.cache.v_scales))
        return sum(int(x.size) * x.dtype.itemsize for x in leaves)

    def check_fits(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise ContextLengthError("the prompt is empty after tokenization; give at least one token")
        if prompt_len >= self.cfg.max_context:
            raise ContextLengthError(
                f"the prompt is {prompt_len} tokens but the model's context is {self.cfg.max_context}; "
                "shorten the prompt (leave room for the answer)"
            )


class EncoderRunner:
    """One encoder's params and its own compiled programs: embeddings and classifier scores per batch."""

    def __init__(self, cfg: EncoderConfig, params: Any, kernels: Kernels | None = None):
        self.cfg, self.params = cfg, params
        if cfg.decoder is not None:  # a decoder's block (EmbeddingGemma): its layers run in the layer loop too
            self.params = stack_layers(params)
        self.kernels = kernels if kernels is not None else Kernels.detect()
        self.programs = Programs()

    def encode(self, tokens: np.ndarray, lengths: np.ndarray, output: str, normalize: bool, head: Any = None,
               scores: str | None = None, dense: tuple[str, ...] = ()) -> jax.Array:
        """tokens [B, T], lengths [B] -> [B, D] pooled vectors (through the Dense modules whose activations
        `dense` names) or [B, L] logits/scores (engine/programs.py _encode), dispatched without waiting."""
        return self.programs.encode(self.params, tokens, lengths, cfg=self.cfg, kernels=self.kernels, output=output,
                                    normalize=normalize, head=head, scores=scores, dense=dense)
