"""Generation suite: prefill and decode tokens/s at several prompt lengths, time to first token (cold and
warm), peak RSS per weight byte and decode as a fraction of the memory-bandwidth roofline — corejax beside
llama.cpp (llama-cpp-python) and HF transformers (`gguf_file=`) on the same GGUF file and the same token ids.

Each runtime runs in a fresh process (corejax/bench/child.py). Per prompt length: one warm-up request
(compiles corejax's programs for those shapes), then `reps` measured ones, all greedy with a fixed number of
decoded tokens. Definitions, the same for every runtime:
- prefill tok/s: prompt tokens / time to evaluate the prompt (corejax: its worker's Timings);
- decode tok/s: tokens after the first / time after the first (corejax: its worker's Timings);
- TTFT warm: caller's wall clock from the request to the first token (corejax: through the sandbox protocol);
- TTFT cold: from constructing the runtime (load, any compile) to the first token of the first request;
- peak RSS: the peak resident memory (VmHWM) of the process that holds the model (corejax: the worker);
- roofline: machine read bandwidth / bytes of weights read per decoded token (the runtime's in-memory
  weights), and the same over the GGUF file's weight bytes (the model's ceiling on this machine).
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from typing import Any

from corejax.bench.child import PeerMissing, import_peer
from corejax.bench.machine import peak_rss_bytes

Step = Callable[[], None]


def _case(ids: list[int], prefill: list[float], decode: list[float], ttft: list[float]) -> dict[str, Any]:
    return {"prompt_tokens": len(ids), "prefill_tok_s": prefill, "decode_tok_s": decode, "ttft_s": ttft}


# --- runners: each runs in its own process (child.py) -------------------------------------------------------

def run_corejax(spec: dict[str, Any], step: Step) -> dict[str, Any]:
    import corejax

    decode_tokens, reps = spec["decode_tokens"], spec["reps"]

    def request(text: str) -> tuple[float, Any]:
        t0, first, result = time.perf_counter(), None, None
        for chunk in session.stream_chunks(text, temperature=0, max_tokens=decode_tokens, ignore_eos=True):
            if first is None and chunk.tokens:
                first = time.perf_counter() - t0
            result = chunk.result or result
        return first, result

    t0 = time.perf_counter()
    # Prefix caching off: every request computes its whole prompt, so prefill is measured, not the cache.
    session = corejax.Session(spec["model"], sandbox=spec["sandbox"], weights=spec["weights"], prefix_cache=False,
                              progress=False, keep_alive=0)  # its own worker: a cold start and RSS of its own
    load_s = time.perf_counter() - t0
    cases, cold = [], None
    try:
        for prompt in spec["prompts"]:
            first, warm = request(prompt["text"])
            if cold is None:
                cold = load_s + first
            step()
            runs = []
            for _ in range(reps):
                runs.append(request(prompt["text"]))
                step()
            ids = list(runs[0][1].prompt_tokens)
            if ids != prompt["ids"]:
                raise RuntimeError(f"corejax tokenized the {prompt['tokens']}-token prompt differently from the "
                                   "ids the peers get; the comparison would not be on the same input")
            cases.append(_case(ids, [r.timings.prefill_tokens_per_s for _, r in runs],
                               [r.timings.decode_tokens_per_s for _, r in runs], [f for f, _ in runs]))
        info = session.info()
        peak = peak_rss_bytes(session.worker_pid)  # the sandboxed worker's; in-process: this process's
    finally:
        session.close()
    return {"load_s": load_s, "ttft_cold_s": cold, "peak_rss_bytes": peak, "bytes_per_token": info["weight_bytes"],
            "cases": cases, "details": {"weights": info.get("weights", spec["weights"]), "sandbox": spec["sandbox"],
                                        "kv_dtype": info.get("kv_dtype"), "threads": "XLA default (all cores)",
                                        "prefix_cache": False, "weight_bytes": info["weight_bytes"],
                                        # the worker's RssAnon/RssFile at the end (mapped weights are file pages)
                                        "resident": info.get("resident"),
                                        "weights_cache": (info.get("weights_cache") or {}).get("status")}}


def _greedy_runs(ids: list[int], spec: dict[str, Any], step: Step, evaluate: Callable[[list[int]], None],
                 first: Callable[[], int], advance: Callable[[int], int]) -> tuple[dict[str, Any], float]:
    """A peer's case: one warm-up and spec["reps"] measured runs of evaluate(prompt ids), first() (the first
    token from the prompt's logits) and decode_tokens - 1 calls of advance(token) -> next token.
    Returns the case and the warm-up's time to first token (the cold one, for the first prompt)."""
    prefill, decode, ttft = [], [], []
    n = spec["decode_tokens"]
    for rep in range(spec["reps"] + 1):
        t0 = time.perf_counter()
        evaluate(ids)
        evaluated = time.perf_counter()
        token = first()
        t1 = time.perf_counter()
        for _ in range(n - 1):
            token = advance(token)
        t2 = time.perf_counter()
        step()
        if rep == 0:
            warm_up_ttft = t1 - t0
        else:
            prefill.append(len(ids) / (evaluated - t0))
            decode.append((n - 1) / (t2 - t1))
            ttft.append(t1 - t0)
    return _case(ids, prefill, decode, ttft), warm_up_ttft


def run_llama_cpp(spec: dict[str, Any], step: Step) -> dict[str, Any]:
    """llama.cpp on the same file: prefill = one eval of the prompt ids; decode = greedy sample + eval."""
    llama_cpp = import_peer("llama_cpp", "llama-cpp-python")
    threads = spec["threads"]
    n_ctx = max(len(p["ids"]) for p in spec["prompts"]) + spec["decode_tokens"] + 16
    t0 = time.perf_counter()
    try:
        llm = llama_cpp.Llama(model_path=spec["model"], n_ctx=max(n_ctx, 512), n_threads=threads,
                              n_threads_batch=threads, n_batch=512, verbose=False)
    except ValueError as e:
        raise PeerMissing(f"llama.cpp cannot load this file ({e})", status="unsupported") from None
    load_s = time.perf_counter() - t0

    def evaluate(ids: list[int]) -> None:
        llm.reset()
        llm.eval(ids)

    def advance(token: int) -> int:
        llm.eval([token])
        return llm.sample(temp=0.0)

    cases, cold = [], None
    for prompt in spec["prompts"]:
        case, first_ttft = _greedy_runs(prompt["ids"], spec, step, evaluate, lambda: llm.sample(temp=0.0), advance)
        cases.append(case)
        cold = load_s + first_ttft if cold is None else cold
    info = llama_cpp.llama_print_system_info()
    # bytes_per_token: ggml reads the file's blocks as they are (mmap).
    return {"load_s": load_s, "ttft_cold_s": cold, "peak_rss_bytes": peak_rss_bytes(),
            "bytes_per_token": spec["file_weight_bytes"], "cases": cases,
            "details": {"version": llama_cpp.__version__, "threads": threads, "n_batch": 512,
                        "build": info.decode() if isinstance(info, bytes) else str(info)}}


def run_transformers(spec: dict[str, Any], step: Step) -> dict[str, Any]:
    """HF transformers loading the same GGUF (`gguf_file=`, dequantized to float32), greedy with its KV cache."""
    torch = import_peer("torch", "torch")
    transformers = import_peer("transformers", "transformers")
    threads = spec["threads"]
    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    folder, name = os.path.split(spec["model"])
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    except (ValueError, KeyError, NotImplementedError, ImportError, OSError) as e:
        raise PeerMissing(f"transformers cannot load this GGUF: {str(e).splitlines()[0][:160]}",
                          status="unsupported") from None
    load_s = time.perf_counter() - t0
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    state: dict[str, Any] = {}

    def forward(ids: list[int], cache: Any) -> int:
        kwargs = {cache_arg: cache} if cache is not None else {}
        out = model(input_ids=torch.tensor([ids]), use_cache=True, **kwargs)
        state["cache"] = getattr(out, cache_arg)
        return int(out.logits[0, -1].argmax())

    def evaluate(ids: list[int]) -> None:
        state["first"] = forward(ids, None)

    cases, cold = [], None
    with torch.inference_mode():
        for prompt in spec["prompts"]:
            case, first_ttft = _greedy_runs(prompt["ids"], spec, step, evaluate, lambda: state["first"],
                                            lambda token: forward([token], state["cache"]))
            cases.append(case)
            cold = load_s + first_ttft if cold is None else cold
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"load_s": load_s, "ttft_cold_s": cold, "peak_rss_bytes": peak_rss_bytes(),
            "bytes_per_token": weight_bytes, "cases": cases,
            "details": {"version": transformers.__version__, "torch": torch.__version__, "threads": threads,
                        "dtype": "float32", "attention": model.config._attn_implementation}}


RUNNERS = {"corejax": run_corejax, "llama.cpp": run_llama_cpp, "transformers": run_transformers}


# --- the suite, in the bench process -----------------------------------------------------------------------

def steps(ctx: Any) -> int:
    return len(ctx.runtimes("generation")) * len(ctx.prompt_lengths) * (ctx.reps + 1)


def run(ctx: Any) -> None:
    from corejax import hub
    from corejax.bench.text import corejax_tokenizer, prompt_of

    source = hub.resolve(ctx.model, progress=False)
    tokenizer = corejax_tokenizer(source)
    prompts, lengths = [], set()
    for n in ctx.prompt_lengths:
        text = prompt_of(lambda t: len(tokenizer.encode(t)), n)
        ids = tokenizer.encode(text)
        if len(ids) not in lengths:  # whole words: two short targets can round to the same prompt
            lengths.add(len(ids))
            prompts.append({"tokens": n, "text": text, "ids": ids})
    file_bytes = None
    if source.format == "gguf":
        from corejax.loading.loader import describe_gguf

        file_bytes = sum(describe_gguf(source.path)["tensor_type_bytes"].values())
    spec = {"model": str(source.path), "prompts": prompts, "decode_tokens": ctx.decode_tokens, "reps": ctx.reps,
            "threads": ctx.threads, "weights": ctx.weights, "sandbox": ctx.sandbox, "file_weight_bytes": file_bytes}
    bandwidth = ctx.read_bandwidth()  # bytes/s
    for label in ctx.runtimes("generation"):
        name, runs = "corejax" if label.startswith("corejax") else label, len(prompts) * (ctx.reps + 1)
        if name != "corejax" and source.format != "gguf":
            ctx.skip("generation", label, "needs a GGUF file (the model is an HF folder)", steps=runs,
                     status="unsupported")
            continue
        out = ctx.child(f"corejax.bench.generation:{RUNNERS[name].__name__}", spec, "generation", label, steps=runs)
        if out is None:
            continue
        ctx.describe("generation", label, out["details"])
        add = ctx.add
        for case in out["cases"]:
            c = f"prompt={case['prompt_tokens']}"
            add("generation", c, label, "prefill_tok_s", case["prefill_tok_s"], "tok/s")
            add("generation", c, label, "decode_tok_s", case["decode_tok_s"], "tok/s")
            add("generation", c, label, "ttft_warm_s", case["ttft_s"], "s", "lower")
            add("generation", c, label, "decode_roofline_fraction",
                [d * out["bytes_per_token"] / bandwidth for d in case["decode_tok_s"]], "fraction")
            if file_bytes:
                add("generation", c, label, "decode_file_roofline_fraction",
                    [d * file_bytes / bandwidth for d in case["decode_tok_s"]], "fraction")
        add("generation", "start", label, "load_s", [out["load_s"]], "s", "lower")
        add("generation", "start", label, "ttft_cold_s", [out["ttft_cold_s"]], "s", "lower")
        add("generation", "memory", label, "peak_rss_mb", [out["peak_rss_bytes"] / 1e6], "MB", "lower")
        add("generation", "memory", label, "weights_read_per_token_mb", [out["bytes_per_token"] / 1e6], "MB", "lower")
        if file_bytes:
            add("generation", "memory", label, "rss_per_weight_byte", [out["peak_rss_bytes"] / file_bytes], "x",
                "lower")
    if file_bytes:
        ctx.add("generation", "roofline", "machine", "file_roofline_tok_s", [bandwidth / file_bytes], "tok/s")
