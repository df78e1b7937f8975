"""Structured output (corejax/serving/structured.py): every output parses and matches, on a random tiny model (where only
the mask can make it so) and on both real models, greedy and sampled, alone and batched, with speculative decoding
and logprobs; bad schemas and grammars fail before any token; an unsatisfiable grammar ends with its own reason."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from corejax.types.config import EngineConfig
from corejax.types.options import SamplingParams, SpeculativeConfig
from corejax.serving.runner import ModelRunner
from corejax.errors import InvalidParameterError
from corejax.hub import ModelSource
from corejax.loading.gguf import read_gguf
from corejax.worker.generator import Generator
from corejax.worker.start import open_runtime
from corejax.engine.sampling import SamplingTensors, allowed, penalty_state, request_keys, sample
from corejax.wire import messages
from corejax.serving.scheduler import Scheduler
from corejax.serving.structured import FINISH_UNSATISFIABLE, GrammarVocab, mask_words
from corejax.types.constraints import Constraint
from corejax.tokenizer.gguf import tokenizer_from_gguf_metadata
from tiny_model import write_tiny_llama

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
SCHEMAS = {
    "person": PERSON,
    "nested": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "location": {"type": "object", "properties": {"lat": {"type": "integer", "minimum": -90, "maximum": 90},
                                                       "lon": {"type": "integer", "minimum": -180, "maximum": 180}},
                     "required": ["lat", "lon"], "additionalProperties": False}},
        "required": ["city", "location"], "additionalProperties": False},
    "array_enum": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "mood": {"enum": ["happy", "sad"]}},
        "required": ["colors", "mood"], "additionalProperties": False},
    "optional_pattern": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "note": {"type": "string", "maxLength": 10},
        "score": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["code"], "additionalProperties": False},
}


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def checked_json(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# --- options and their validation: before any token ------------------------------------------------------


@pytest.mark.parametrize("options, words", [
    (dict(response_format=json_format({"type": "objec"})), "objec"),
    (dict(response_format={"type": "xml"}), "'xml'"),
    (dict(response_format={"type": "json_schema"}), "json_schema"),
    (dict(response_format="json"), "response_format must be a dict"),
    (dict(regex="[0-9"), "regex"),
    (dict(grammar="start: missing_rule"), "missing_rule"),
    (dict(grammar='root ::= "a" [0-9'), "GBNF"),
    (dict(choice=[]), "choice"),
    (dict(choice="yes"), "choice"),
    (dict(regex="a", choice=["a"]), "at most one"),
])
def test_invalid_constraints_are_rejected_with_a_reason(options, words):
    with pytest.raises(InvalidParameterError, match=re.escape(words)):
        SamplingParams.from_kwargs(**options)


def test_constraint_options_and_wire_round_trip():
    assert SamplingParams.from_kwargs(response_format={"type": "text"}).constraint is None
    sp = SamplingParams.from_kwargs(response_format=json_format(PERSON), temperature=0)
    assert sp.constraint.kind == "json_schema" and json.loads(sp.constraint.source) == PERSON
    assert list(json.loads(sp.constraint.source)["properties"]) == ["name", "age"]  # key order is kept
    bare = SamplingParams.from_kwargs(response_format={"type": "json_schema", "json_schema": PERSON})
    assert bare.constraint == sp.constraint
    assert messages.sampling_from_wire(messages.sampling_to_wire(sp)) == sp
    gbnf = Constraint.from_options(grammar='root ::= "a" [0-9]+')
    assert gbnf.kind == "grammar"
    with pytest.raises(InvalidParameterError, match="constraint"):
        SamplingParams(constraint={"kind": "regex", "source": "a"})


# --- the mask in the sampler ---------------------------------------------------------------------------


def pack(allow: np.ndarray) -> np.ndarray:
    """[B, V] bool -> llguidance's [B, W] int32 bitmask."""
    b, v = allow.shape
    padded = np.zeros((b, mask_words(v) * 32), bool)
    padded[:, :v] = allow
    bits = (padded.reshape(b, -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(-1)
    return bits.astype(np.uint32).view(np.int32)


def test_bitmask_unpacks_to_the_allowed_tokens():
    rng = np.random.default_rng(0)
    allow = rng.random((3, 77)) < 0.3
    assert np.array_equal(np.asarray(allowed(jnp.asarray(pack(allow)), 77)), allow)


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0),
                                      dict(temperature=1.5, top_k=0, top_p=0.9),
                                      dict(temperature=0.7, repetition_penalty=1.3)])
def test_sampler_draws_only_allowed_tokens(settings):
    rng = np.random.default_rng(1)
    b, v = 8, 300
    logits = rng.normal(size=(b, v)).astype(np.float32) * 3
    allow = rng.random((b, v)) < 0.05
    allow[np.arange(b), rng.integers(0, v, b)] = True
    params = [SamplingParams(seed=s, **settings) for s in range(b)]
    tensors = SamplingTensors.from_params(params, v)
    penalties = None
    if tensors.any_penalty:
        penalties = penalty_state([([1, 2, 3], [])] * b, b, v)
    for step in range(20):
        out = sample(jnp.asarray(logits), tensors, penalties, request_keys(params), step, jnp.asarray(pack(allow)))
        tokens = np.asarray(out.tokens)
        assert allow[np.arange(b), tokens].all()
    if settings["temperature"] == 0.0:
        assert tokens.tolist() == np.where(allow, logits, -np.inf).argmax(-1).tolist()
        everything = np.ones((b, v), bool)
        free = sample(jnp.asarray(logits), tensors, None, request_keys(params), 0)
        assert np.asarray(free.tokens).tolist() == np.asarray(sample(
            jnp.asarray(logits), tensors, None, request_keys(params), 0, jnp.asarray(pack(everything))).tokens).tolist()


# --- the vocabulary: both real tokenizers, teacher-forced --------------------------------------------------


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def vocab(request, smollm2_gguf, gemma3_gguf):
    with read_gguf(smollm2_gguf if request.param == "smollm2" else gemma3_gguf) as f:
        tok = tokenizer_from_gguf_metadata(f.metadata)
    return tok, GrammarVocab(tok, tok.vocab_size)


@pytest.mark.parametrize("options, text", [
    (dict(response_format=json_format(SCHEMAS["nested"])),
     '{"city": "Zürich", "location": {"lat": 47, "lon": 8}}'),
    (dict(response_format=json_format(SCHEMAS["optional_pattern"])), '{\n  "code": "AB-123",\n  "score": 50\n}'),
    (dict(response_format=json_format({"type": "object", "properties": {"x": {"type": "number"}}})),
     '{"x": 2.5e3}'),
    (dict(regex=r"\d{4}-\d{2}-\d{2}"), "2026-12-05"),
    (dict(grammar='root ::= "x=" [0-9]+ ";"'), "x=42;"),
])
def test_real_tokenizations_of_conforming_text_are_allowed(vocab, options, text):
    tok, gv = vocab
    matcher = gv.matcher(SamplingParams.from_kwargs(**options).constraint)
    masks = np.zeros((1, mask_words(tok.vocab_size)), np.int32)
    ids = tok.encode(text, add_special=False)
    for token in ids:
        gv.fill([(matcher, 0, [])], masks)
        assert masks[0, token // 32] >> (token % 32) & 1, (text, tok.token_bytes(token))
        matcher.consume(token)
    gv.fill([(matcher, 0, [])], masks)
    allowed_now = {i for i in range(tok.vocab_size) if masks[0, i // 32] >> (i % 32) & 1}
    assert allowed_now == set(tok.eos_ids) or matcher.done  # complete: only the end may follow


def test_nonconforming_tokens_are_masked(vocab):
    tok, gv = vocab
    matcher = gv.matcher(Constraint.from_options(regex="[0-9]+"))
    masks = np.zeros((1, mask_words(tok.vocab_size)), np.int32)
    gv.fill([(matcher, 0, [])], masks)
    bits = np.unpackbits(masks.view(np.uint8), bitorder="little")[:tok.vocab_size]
    for token in np.flatnonzero(bits)[:2000].tolist():
        assert tok.token_bytes(token).decode("utf-8", "replace").isdigit(), tok.token_bytes(token)
    assert not bits[tok.encode("a", add_special=False)[0]]
    assert matcher.valid_prefix(tok.encode("12a3", add_special=False)) < len(tok.encode("12a3", add_special=False))


# --- the whole path on a random tiny model: only the mask makes its output conform ------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("structured") / "tiny.gguf", context=256)
    return open_runtime(ModelSource("tiny", "gguf", path), progress=False)


def run(runtime: Generator, prompt: str, **kw):
    spec = kw.pop("speculative", None)
    *_, last = runtime.stream(prompt, None, SamplingParams.from_kwargs(**kw), spec)
    return last.result


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_model_output_conforms(tiny, temperature):
    for name in ("person", "array_enum"):
        # A random model would spend its tokens on the whitespace JSON allows between items; compact JSON
        # (llguidance's x-guidance option, passed through) leaves it only the values to choose.
        schema = dict(SCHEMAS[name], **{"x-guidance": {"whitespace_flexible": False}})
        r = run(tiny, "hi", response_format=json_format(schema), temperature=temperature, seed=3,
                max_tokens=200)
        assert r.finish_reason == "stop", r
        checked_json(r.text, SCHEMAS[name])
    r = run(tiny, "hi", regex=r"[a-c]{2,4}@[0-9]\.(com|org)", temperature=temperature, seed=4, max_tokens=40)
    assert r.finish_reason == "stop" and re.fullmatch(r"[a-c]{2,4}@[0-9]\.(com|org)", r.text), r.text
    r = run(tiny, "hi", choice=["alpha", "beta", "gamma delta"], temperature=temperature, seed=5, max_tokens=40)
    assert r.text in ("alpha", "beta", "gamma delta") and r.finish_reason == "stop"
    r = run(tiny, "hi", grammar='root ::= "(" [0-9]{1,3} ("+" [0-9]{1,3}){0,3} ")"', temperature=temperature,
            max_tokens=60)  # at most 17 characters: it must end before max_tokens
    assert r.finish_reason == "stop" and re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3}){0,3}\)", r.text), r.text


@pytest.mark.parametrize("speculative", [{"method": "ngram", "k": 3, "ngram_min": 1},
                                         {"method": "draft", "draft_weights": "int8", "k": 3}])
def test_speculative_constrained_text_is_plain_constrained_text(tiny, speculative):
    for temperature in (0.0, 0.9):
        kw = dict(regex="(ab|abc|b){1,6}c", temperature=temperature, seed=2, max_tokens=30)
        plain = run(tiny, "abab abab", **kw)
        spec = run(tiny, "abab abab", speculative=speculative, **kw)
        assert spec.tokens == plain.tokens and re.fullmatch("(ab|abc|b){1,6}c", spec.text), (spec.text, plain.text)
        # n-gram drafts come from the text itself; a draft model drafts under a fork of the request's grammar.
        assert spec.timings.draft_tokens > 0 and spec.timings.accepted_draft_tokens > 0


def test_unsatisfiable_grammar_ends_with_its_reason(tiny):
    last = tiny.model.cfg.vocab_size - 1
    r = run(tiny, "hi", grammar=f"start: <[^0-{last}]>", max_tokens=8)  # no token of the vocabulary is allowed
    assert r.finish_reason == FINISH_UNSATISFIABLE and r.tokens == () and r.text == ""


def test_constrained_logprobs_and_mask_time(tiny):
    r = run(tiny, "hi", choice=["alpha", "beta"], temperature=0.8, seed=1, logprobs=2, max_tokens=10)
    assert len(r.logprobs) == len(r.tokens) > 0
    assert all(np.isfinite(lp.logprob) and lp.logprob <= 0 and len(lp.top) == 2 for lp in r.logprobs)
    assert r.timings.mask_s > 0


def test_constrained_and_free_rows_share_a_batch(tiny):
    sch = Scheduler(ModelRunner(tiny.model.cfg, tiny.model.params, EngineConfig()), background=False)
    prompt = tiny.tokenizer.encode("hello there")
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = sch.submit(prompt, free, frozenset())
    sch.run_until_idle()
    alone = [e.token for e in alone]
    sp = SamplingParams.from_kwargs(regex="[0-9]{3,6}", temperature=0.0, max_tokens=12)
    reqs = [sch.submit(prompt, free, frozenset()),
            sch.submit(prompt, sp, frozenset(), None, tiny.matcher(sp.constraint)),
            sch.submit(prompt, free, frozenset())]
    sch.run_until_idle()
    got = [[e.token for e in r] for r in reqs]
    assert got[0] == got[2] == alone  # the constrained neighbour does not change free rows
    assert re.fullmatch("[0-9]{3,6}", tiny.tokenizer.decode(got[1])), got[1]


# --- both real models --------------------------------------------------------------------------------------

REAL_PROMPT = "Answer with JSON only.\nQuestion: describe {what}.\nAnswer:"
WHAT = {"person": "a 30-year-old person called Alice", "nested": "the city of Paris and where it is",
        "array_enum": "the colours of the French flag and your mood", "optional_pattern": "a product code"}


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request, smollm2_gguf, gemma3_gguf):
    path = smollm2_gguf if request.param == "smollm2" else gemma3_gguf
    return open_runtime(ModelSource(request.param, "gguf", path), progress=False)


def generate_batch(runtime: Generator, jobs: list[tuple[str, SamplingParams]], spec=None,
                   drafted: list | None = None) -> list[list[int]]:
    sch = Scheduler(ModelRunner(runtime.model.cfg, runtime.model.params, EngineConfig()), background=False)
    reqs = [sch.submit(runtime.tokenizer.encode(p), sp, runtime.tokenizer.eos_ids, spec,
                       runtime.matcher(sp.constraint)) for p, sp in jobs]
    sch.run_until_idle()
    if drafted is not None:
        drafted.extend(r.times.drafted for r in reqs)
    return [[e.token for e in r] for r in reqs]


@pytest.mark.slow
def test_real_models_schemas_greedy_sampled_alone_and_batched(real):
    jobs = []
    for name, schema in SCHEMAS.items():
        for temperature, seed in ((0.0, None), (0.9, 7)):
            sp = SamplingParams.from_kwargs(response_format=json_format(schema), temperature=temperature, seed=seed,
                                            max_tokens=120)
            jobs.append((name, REAL_PROMPT.format(what=WHAT[name]), sp))
    batched = generate_batch(real, [(p, sp) for _, p, sp in jobs])
    for (name, prompt, sp), tokens in zip(jobs, batched):
        text = real.tokenizer.decode(tokens)
        checked_json(text.strip(), SCHEMAS[name])
    # Alone, the same requests give the same tokens (a batch never changes a row's text).
    for i in (0, 3):
        assert generate_batch(real, [jobs[i][1:]])[0] == batched[i]


@pytest.mark.slow
def test_real_models_generate_only_the_listed_properties(real):
    """Issue #39: a schema that does not say additionalProperties gets only its listed keys (with
    "additionalProperties": true, SmolLM2 kept adding keys until max_tokens at seeds 1 and 4)."""
    person = {"type": "object", "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
              "required": ["name", "born"]}
    schema = {"type": "object", "properties": {"person": person}, "required": ["person"]}
    prompt = "Answer with JSON only.\nQuestion: describe Ada Lovelace, born 1815.\nAnswer:"
    jobs = [(prompt, SamplingParams.from_kwargs(response_format=json_format(schema), temperature=t, seed=seed,
                                                max_tokens=120)) for t, seed in ((0.0, None), (0.9, 1), (0.9, 4))]
    for tokens in generate_batch(real, jobs):
        text = real.tokenizer.decode(tokens)
        value = checked_json(text.strip(), schema)
        assert len(tokens) < 120 and set(value) == {"person"} and set(value["person"]) == {"name", "born"}, text


@pytest.mark.slow
def test_real_models_constrained_greedy_equals_free_greedy_when_it_conforms(real):
    prompt = "The three primary colours are"
    free = generate_batch(real, [(prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))])[0]
    text = real.tokenizer.decode(free)
    for options in (dict(choice=[text, text + " and more"]), dict(regex=r"(?s).*")):
        sp = SamplingParams.from_kwargs(temperature=0.0, max_tokens=10, ignore_eos=True, **options)
        assert generate_batch(real, [(prompt, sp)])[0] == free, options


@pytest.mark.slow
def test_real_models_regex_choice_and_speculative(real):
    prompt = ("Rewrite the list with numbers.\nApples, pears, plums.\n1. Apples\n2. Pears\n3. Plums\n\nAgain:\n")
    pattern = r"(1\. [A-Z][a-z]+\n)(2\. [A-Z][a-z]+\n)(3\. [A-Z][a-z]+\n)"
    for temperature in (0.0, 0.8):
        sp = SamplingParams.from_kwargs(regex=pattern, temperature=temperature, seed=11, max_tokens=40)
        plain = generate_batch(real, [(prompt, sp)])[0]
        assert re.fullmatch(pattern, real.tokenizer.decode(plain)), real.tokenizer.decode(plain)
        drafted = []
        spec = generate_batch(real, [(prompt, sp)], SpeculativeConfig(method="ngram", k=4), drafted)[0]
        assert spec == plain and drafted[0] > 0
    choice = SamplingParams.from_kwargs(choice=["positive", "negative"], temperature=0.0)
    got = generate_batch(real, [("Review: I loved this film!\nSentiment:", choice)])[0]
    assert real.tokenizer.decode(got).strip() in ("positive", "negative")


def test_benchmark_engines_part_runs(smollm2_gguf):
    """benchmarks/structured.py's teacher-forced engine comparison (xgrammar's row only where it is installed)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "structured_bench", Path(__file__).parent.parent / "benchmarks" / "structured.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.engines_part("smollm2-135m-instruct")
    assert rows[0]["engine"] == "llguidance" and rows[0]["all_forced_tokens_allowed"]
    assert rows[0]["steps"] > 100 and rows[0]["mask_us_median"] > 0


def test_cli_flags(tmp_path, tiny):
    import subprocess
    import sys

    model = tiny.source.path
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(dict(SCHEMAS["array_enum"], **{"x-guidance": {"whitespace_flexible": False}})))

    def generate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "corejax.cli", "generate", "hi", "-m", str(model), "-q",
                               "--keep-alive", "0", "--no-sandbox", "-n", "80", *args], capture_output=True,
                              text=True, timeout=300)

    out = generate("--json-schema", str(schema), "--temperature", "0.7", "--seed", "3")
    assert out.returncode == 0, out.stderr
    checked_json(out.stdout.strip(), SCHEMAS["array_enum"])
    out = generate("--regex", "[0-9]{2}-[a-c]+", "--greedy")
    assert out.returncode == 0 and re.fullmatch("[0-9]{2}-[a-c]+", out.stdout.strip()), out
    out = generate("--regex", "a", "--choice", "b")
    assert out.returncode != 0 and "at most one of --json-schema" in out.stderr
