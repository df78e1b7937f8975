"""The memory budget: what the worker reserves, by whom, before it allocates — and the clear error when a
reservation would exceed the session's memory_limit.

A Session's memory_limit is enforced twice. Here, in the worker, every big allocation is reserved against it
*before* it happens: the weights (sized from the file's tensor table and the weights mode, before a tensor is
read), the KV page pool, and a workspace estimate; a model that cannot fit fails in well under a second with
MemoryBudgetError, having allocated nothing. And the parent keeps killing a worker whose resident memory
passes the limit anyway (corejax/client/workers.py), the backstop for what an estimate misses.

No JAX here: the parent parses memory_limit with this module before a worker starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from corejax.errors import MemoryBudgetError
from corejax.types.config import QUANTIZED_KV
from corejax.types.sizes import format_size, parse_size

# What a worker holds besides weights and KV, each constant rounded up from measurements on the 2-core machines
# this was built on (docs/MEASUREMENTS.md, "Memory model", has the figures and how they were taken):
# RUNTIME_BASELINE: the interpreter, numpy, jax/jaxlib and corejax's modules before a model is read.
RUNTIME_BASELINE = 240 << 20
# XLA:CPU keeps every compiled program resident: the compiler's first use, then each program (one compiled
# layer run in a loop for decoders; encoders are still unrolled, so per layer), PROGRAMS_RESERVED of them. A
# workload with many more programs grows past the reservation, and the parent's RSS check is what stops it.
COMPILER_BASELINE = 144 << 20
PROGRAM_BYTES = 24 << 20
PROGRAM_BYTES_PER_LAYER = 4 << 20
PROGRAM_BYTES_MIN = 16 << 20
PROGRAMS_RESERVED = 8
# Kept-quantized weights without the native kernel compile to bigger programs (each matmul carries its
# dequantize loop).
QUANT_PROGRAM_FACTOR = 2.25
# The tokenizer's tables and the GGUF metadata they came from, per vocabulary entry.
TOKENIZER_BYTES_PER_TOKEN = 640

# Fewest KV tokens a pool sized from the budget may hold: less than this serves no useful request.
MIN_AUTO_KV_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class Reservation:
    """`nbytes` held under `name`; `detail` says what it is made of (for reports and error messages)."""

    name: str
    nbytes: int
    detail: str = ""

    def describe(self) -> str:
        return f"{self.name} {format_size(self.nbytes)}" + (f" ({self.detail})" if self.detail else "")


class MemoryBudget:
    """Named reservations against an optional limit (None: reservations are recorded, never refused)."""

    def __init__(self, limit: int | None = None):
        self.limit = None if limit is None else parse_size(limit)
        self.reservations: dict[str, Reservation] = {}
        self.planned: dict[str, Reservation] = {}  # admitted, reserved when allocated (reserve_serving)
        self.peak = 0

    @property
    def used(self) -> int:
        return sum(r.nbytes for r in self.reservations.values())

    @property
    def available(self) -> int | None:
        return None if self.limit is None else self.limit - self.used

    def check(self, wanted: Iterable[Reservation], *, hint: str = "", what: str = "this session") -> None:
        """Raises MemoryBudgetError unless `wanted`, held together with everything reserved now, fits."""
        wanted = [r for r in wanted if r.name not in self.reservations]
        total = self.used + sum(r.nbytes for r in wanted)
        if self.limit is None or total <= self.limit:
            return
        parts = sorted([*self.reservations.values(), *wanted], key=lambda r: -r.nbytes)
        raise MemoryBudgetError(
            f"{what} needs {format_size(total)} but memory_limit is {format_size(self.limit)}: "
            + ", ".join(r.describe() for r in parts) + ". "
            + (hint or "Raise memory_limit.")
        )

    def reserve(self, name: str, nbytes: int, detail: str = "", *, hint: str = "", what: str = "this session"
                ) -> Reservation:
        """Reserves (or re-sizes) `name`; MemoryBudgetError, with nothing reserved, if it would not fit."""
        old = self.reservations.pop(name, None)
        r = Reservation(name, int(nbytes), detail)
        try:
            self.check([r], hint=hint, what=what)
        except MemoryBudgetError:
            if old is not None:
                self.reservations[name] = old
            raise
        self.reservations[name] = r
        self.peak = max(self.peak, self.used)
        return r

    def release(self, name: str) -> None:
        self.reservations.pop(name, None)

    def report(self) -> dict[str, Any]:
        """Plain data (crosses the protocol): limit, used, peak and each reservation's bytes and detail."""
        return {
            "limit": self.limit,
            "used": self.used,
            "available": self.available,
            "peak": self.peak,
            "reservations": {r.name: {"bytes": r.nbytes, "detail": r.detail} for r in self.reservations.values()},
        }


# ------------------------------------------------------------------------------------------------------------
# What a decoder needs besides its weights and KV pool (estimates; the module docstring says how they were made)


def program_bytes(num_layers: int) -> int:
    """One unrolled (encoder) program."""
    return max(PROGRAM_BYTES_MIN, num_layers * PROGRAM_BYTES_PER_LAYER)


def activation_bytes(cfg: Any, tokens: int) -> int:
    return _activations(cfg.hidden_size, cfg.ffn_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.vocab_size, tokens)


def _activations(d: int, f: int, heads: int, kv_heads: int, h: int, vocab: int, tokens: int) -> int:
    """Float32 temporaries of one forward over `tokens` positions (batch 1): the residual stream and its norm,
    Q/K/V, attention output and the flash kernel's score tiles, the MLP's gate/up/product, and the sampler's
    vocabulary-wide rows. XLA reuses buffers across layers, so one layer's worth is live at a time; doubled
    for the buffers XLA keeps for both the input and the output of fused ops."""
    q, kv = heads * h, kv_heads * h
    per_token = 4 * d + q + 2 * kv + q + 3 * f + heads * 128  # 128: key tile of the flash kernel
    return 2 * 4 * tokens * per_token + 8 * 4 * vocab


def workspace_bytes(cfg: Any, prefill_chunk: int, weights: str = "f32", native: bool = False) -> tuple[int, str]:
    """-> (bytes, detail) for activations of the largest prefill chunk plus the reserved compiled programs.
    native: the native kernels serve the matmuls (then a quantized matmul is one custom call, no bigger)."""
    chunk = min(prefill_chunk, cfg.max_context)
    act = activation_bytes(cfg, chunk)
    factor = 1 if weights == "f32" or native else QUANT_PROGRAM_FACTOR
    programs = int(PROGRAMS_RESERVED * PROGRAM_BYTES * factor)
    return act + COMPILER_BASELINE + programs, (
        f"activations of a {chunk}-token prefill chunk {format_size(act)}, the compiler "
        f"{format_size(COMPILER_BASELINE)}, {PROGRAMS_RESERVED} compiled programs {format_size(programs)}")


def _encoder_workspace(cfg: Any) -> tuple[int, str]:
    act = _activations(cfg.hidden_size, cfg.ffn_size, cfg.num_heads, cfg.num_heads, cfg.head_dim, 0,
                       cfg.max_context)
    return act + COMPILER_BASELINE + PROGRAMS_RESERVED * program_bytes(cfg.num_layers), (
        f"a {cfg.max_context}-token batch {format_size(act)}, {PROGRAMS_RESERVED} compiled programs")


def auto_kv_tokens(budget: MemoryBudget, kv_bytes_per_token: float, page_size: int, max_tokens: int) -> int | None:
    """The KV pool size rule when kv_cache_tokens is not given and a limit is: whatever the limit leaves after
    the reservations held now, in whole pages, capped at `max_tokens` (the model's context, or
    EngineConfig.kv_cache_max_bytes' worth). None when there is no limit (the EngineConfig default applies)."""
    if budget.available is None:
        return None
    page = kv_bytes_per_token * page_size
    pages = int(budget.available // page) - 1  # page 0 is the padding target
    return max(0, min(pages * page_size, max_tokens // page_size * page_size))


# ------------------------------------------------------------------------------------------------------------
# The reservations of one Runtime, in the order the worker allocates


def admit(budget: MemoryBudget, plan: Any, engine_cfg: Any, name: str = "the model", native: bool = False) -> Any:
    """Checks, before anything is allocated, that loading `plan` (loader.WeightPlan) and then serving it with
    `engine_cfg` fit the budget; reserves the runtime, the weights and the loading transient; returns the
    EngineConfig to build the engine with (kv_cache_tokens sized to what the budget leaves, if it was None).

    Two moments are checked, since the loading transient is gone before the KV pool is allocated:
    loading = runtime + weights + (mapped file pages + float32 copies of the largest tensor);
    serving = runtime + weights + KV pool + workspace."""
    import dataclasses as dc

    from corejax.types.config import EncoderConfig

    cfg = plan.cfg
    what = f"loading {name}"
    runtime = Reservation("runtime", RUNTIME_BASELINE, "Python, JAX/XLA and corejax before the model")
    mapped = getattr(plan, "mapped", False)  # file-backed pages of the weights cache: counted in RSS as RssFile
    weights = Reservation("weights", plan.weight_bytes, f"{plan.tensors} tensors as weights={plan.weights!r}"
                          + (", mapped from the weights cache (file-backed)" if mapped else ""))
    loading = Reservation("loading", plan.loading_bytes, "the file's header only: the weights are mapped" if mapped
                          else "file pages and tensor copies while reading; freed after")
    vocab = cfg.vocab_size
    tokenizer = Reservation("tokenizer", vocab * TOKENIZER_BYTES_PER_TOKEN, f"{vocab} tokens' tables")
    hints = []
    if isinstance(cfg, EncoderConfig):
        work = Reservation("workspace", *_encoder_workspace(cfg))
        hint = "Raise memory_limit."
        budget.check([runtime, tokenizer, weights, work], hint=hint, what=what)
        budget.check([runtime, tokenizer, weights, loading], hint=hint, what=what)
        for r in (runtime, tokenizer, weights, loading):
            budget.reserve(r.name, r.nbytes, r.detail)
        budget.planned = {"workspace": work}
        return engine_cfg
    ws_bytes, ws_detail = workspace_bytes(cfg, engine_cfg.prefill_chunk, plan.weights, native)
    work = Reservation("workspace", ws_bytes, ws_detail)
    native_bytes = plan.native_bytes
    if native_bytes is not None and plan.weights != "native" and (
            native_bytes + workspace_bytes(cfg, engine_cfg.prefill_chunk, "native", native)[0]
            < plan.weight_bytes + ws_bytes):
        # Kept-quantized weights are smaller but compile to bigger programs: offered only when the sum shrinks.
        hints.append(f"weights='native' (this file's blocks kept quantized: {format_size(native_bytes)} of weights)")
    per_token = engine_cfg.kv_bytes_per_token(cfg)
    explicit = engine_cfg.kv_cache_tokens is not None
    if not explicit and budget.limit is not None:
        default_tokens = min(cfg.max_context, int(engine_cfg.kv_cache_max_bytes // per_token))
        probe = MemoryBudget(budget.limit)
        for r in (*budget.reservations.values(), runtime, tokenizer, weights, work):
            probe.reservations[r.name] = r
        tokens = auto_kv_tokens(probe, per_token, engine_cfg.page_size, default_tokens)
        floor = min(MIN_AUTO_KV_TOKENS, cfg.max_context)
        if tokens < floor:
            kv_floor = Reservation("kv_pool", int((-(-floor // engine_cfg.page_size) + 1) * engine_cfg.page_size
                                                  * per_token), f"the smallest useful pool, {floor} tokens")
            without_kv = budget.used + runtime.nbytes + tokenizer.nbytes + weights.nbytes + work.nbytes
            kv_helps = without_kv < budget.limit and engine_cfg.kv_dtype not in QUANTIZED_KV
            budget.check([runtime, tokenizer, weights, work, kv_floor], what=what, hint=_hint(
                hints + ["kv_dtype='int8' or 'int4' (more tokens per byte)"] if kv_helps else hints))
        engine_cfg = dc.replace(engine_cfg, kv_cache_tokens=max(tokens, engine_cfg.page_size))
    pages = engine_cfg.num_pages(cfg)
    tokens = (pages - 1) * engine_cfg.page_size
    kv = Reservation("kv_pool", kv_pool_bytes(engine_cfg, cfg),
                     f"{tokens} tokens in {pages} pages of {engine_cfg.kv_dtype}")
    if explicit:
        hints.insert(0, f"a smaller kv_cache_tokens (now {tokens}: {format_size(kv.nbytes)})")
    if engine_cfg.kv_dtype not in QUANTIZED_KV:
        hints.append(f"kv_dtype='int8' (1 byte per KV value instead of {4 if engine_cfg.kv_dtype == 'float32' else 2})")
    budget.check([runtime, tokenizer, weights, kv, work], hint=_hint(hints), what=what)
    budget.check([runtime, tokenizer, weights, loading], what=what,
                 hint=_hint([h for h in hints if h.startswith("weights=")]))
    for r in (runtime, tokenizer, weights, loading):
        budget.reserve(r.name, r.nbytes, r.detail)
    budget.planned = {"kv_pool": kv, "workspace": work}
    return engine_cfg


def kv_pool_bytes(engine_cfg: Any, cfg: Any) -> int:
    """Bytes of the PagedKVCache pool engine_cfg builds (page 0 included): values and, for int8/int4, scales."""
    return int(engine_cfg.num_pages(cfg) * engine_cfg.page_size * engine_cfg.kv_bytes_per_token(cfg))


def _hint(options: list[str]) -> str:
    if not options:
        return "Raise memory_limit."
    return "Use " + ", or ".join(options) + ", or raise memory_limit."


def loaded(budget: MemoryBudget, weight_bytes: int) -> None:
    """After loading: the weights' estimate becomes what they hold, and the loading transient is freed."""
    detail = budget.reservations["weights"].detail if "weights" in budget.reservations else ""
    budget.release("loading")
    budget.reserve("weights", weight_bytes, detail)


def resident(pid: int | str = "self") -> dict[str, int]:
    """The process's resident bytes split as the kernel counts them (Linux; {} elsewhere): rss_anon (heap,
    anonymous mappings: what only this process holds), rss_file (file-backed pages: the shared libraries, and
    weights mapped from the weights cache, which the page cache shares and may drop), rss and peak (VmHWM)."""
    names = {"RssAnon": "rss_anon", "RssFile": "rss_file", "RssShmem": "rss_shmem", "VmRSS": "rss", "VmHWM": "peak"}
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in names:
                    out[names[key]] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def reserve_serving(budget: MemoryBudget) -> None:
    """Before the KV pool is allocated: the pool and the workspace admit() planned (an encoder: no pool)."""
    for r in budget.planned.values():
        budget.reserve(r.name, r.nbytes, r.detail)
