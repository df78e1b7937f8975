"""The JSON schema of a `corejax bench` record, and a small validator for the subset of JSON Schema it uses.

One record is one run: what ran it (command, config), where (fingerprint), how each runtime was set up
(runtimes), what was skipped and why, and a flat list of results. Each result is one metric of one runtime
on one case of one suite, with every sample kept, so any two records can be compared entry by entry
(corejax/bench/record.py `compare`). `corejax bench --schema` prints this schema.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1

_NUMBER = {"type": "number"}
_STRING = {"type": "string"}
_OPT_STRING = {"type": ["string", "null"]}

RESULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["suite", "case", "runtime", "metric", "unit", "better", "median", "min", "max", "n", "samples"],
    "additionalProperties": False,
    "properties": {
        "suite": {"type": "string", "enum": ["machine", "generation", "embedding", "ipc", "startup", "tokenizer",
                                              "concurrency", "speculative", "micro"]},
        "case": {"type": "string", "description": "the workload, e.g. 'prompt=128' or 'streams=4'"},
        "runtime": {"type": "string", "description": "e.g. 'corejax', 'llama.cpp', 'transformers'"},
        "metric": {"type": "string", "description": "e.g. 'decode_tok_s', 'ttft_warm_s', 'p95_ms'"},
        "unit": _STRING,
        "better": {"type": "string", "enum": ["higher", "lower"],
                   "description": "which direction is an improvement (the comparison uses it)"},
        "median": _NUMBER,
        "min": _NUMBER,
        "max": _NUMBER,
        "n": {"type": "integer", "minimum": 1, "description": "number of samples"},
        "samples": {"type": "array", "minItems": 1, "items": _NUMBER},
    },
}

SKIPPED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["suite", "runtime", "reason"],
    "additionalProperties": False,
    "description": "a runtime that was not measured in a suite ('*': the whole suite failed), and why",
    "properties": {
        "suite": _STRING,
        "runtime": _STRING,
        "reason": {"type": "string", "description": "what happened, in one line"},
        "status": {"type": "string", "enum": ["missing", "unsupported", "crashed", "timeout", "failed"],
                   "description": "missing: not installed; unsupported: cannot run this model or format; crashed: "
                                  "its process was killed by a signal; timeout: it finished no step within "
                                  "--peer-timeout and was killed; failed: it raised, exited with an error or "
                                  "fails to import (absent in records before this field: read as missing)"},
        "signal": {"type": "string", "description": "crashed: the signal's name, e.g. 'SIGSEGV'"},
        "returncode": {"type": "integer", "description": "its process's exit status (negative: -signal number)"},
        "output_tail": {"type": "string", "description": "the last lines of its process's stderr and stdout"},
        "advice": {"type": "string", "description": "what to do, e.g. for llama.cpp the CMAKE_ARGS of a "
                                                    "llama-cpp-python build that runs on this CPU"},
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "corejax bench record",
    "type": "object",
    "required": ["schema_version", "created", "command", "config", "fingerprint", "runtimes", "skipped",
                 "results"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "created": {"type": "string", "description": "UTC time the run started, ISO 8601"},
        "command": {"type": "string", "description": "the exact command line that produced the record"},
        "config": {
            "type": "object",
            "required": ["suites", "model", "reps", "quick"],
            "properties": {
                "suites": {"type": "array", "items": _STRING},
                "model": _STRING,
                "reps": {"type": "integer", "minimum": 1},
                "quick": {"type": "boolean"},
            },
        },
        "fingerprint": {
            "type": "object",
            "required": ["cpu", "cpu_flags", "cores", "usable_cores", "memory_bytes", "machine", "system",
                         "python", "numpy", "jax", "jaxlib", "backend", "devices", "corejax", "packages"],
            "properties": {
                "cpu": _STRING,
                "cpu_flags": {"type": "array", "items": _STRING,
                              "description": "the SIMD/matrix flags of /proc/cpuinfo that matter for inference"},
                "cores": {"type": "integer", "minimum": 1},
                "usable_cores": {"type": "integer", "minimum": 1},
                "memory_bytes": {"type": ["integer", "null"]},
                "machine": _STRING,
                "system": _STRING,
                "python": _STRING,
                "numpy": _STRING,
                "jax": _OPT_STRING,
                "jaxlib": _OPT_STRING,
                "backend": _OPT_STRING,
                "devices": {"type": "array", "items": _STRING},
                "corejax": _STRING,
                "kernel_isa": {"type": "string", "description": "the native kernels' path (kernels/isa.h: "
                               "avx512_vnni, avx_vnni, avx2, neon_dotprod, scalar) or xla; COREJAX_ISA picks it"},
                "packages": {"type": "object", "additionalProperties": _OPT_STRING,
                             "description": "installed versions of the peers (null: not installed)"},
                "load_average": {"type": "array", "items": _NUMBER,
                                 "description": "1/5/15-minute load averages when the run started"},
                "load_average_end": {"type": "array", "items": _NUMBER, "description": "the same, when it ended"},
            },
        },
        "runtimes": {
            "type": "object",
            "description": "runtime label -> suite -> how it was set up there (threads, weights, build, flags)",
            "additionalProperties": {"type": "object", "additionalProperties": {"type": "object"}},
        },
        "skipped": {"type": "array", "items": SKIPPED_SCHEMA},
        "results": {"type": "array", "items": RESULT_SCHEMA},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(value: Any, schema: dict[str, Any] = SCHEMA, path: str = "$") -> list[str]:
    """Every violation of `schema` in `value`, as 'path: what' lines (empty: valid).

    Implements the keywords SCHEMA uses: type, enum, required, properties, additionalProperties, items,
    minItems, minimum. jsonschema, where installed, validates the same records (the tests run both)."""
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        if not any(_is(value, t) for t in names):
            return [f"{path}: expected {' or '.join(names)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        errors.append(f"{path}: {value} < minimum {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                errors.append(f"{path}: missing required {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                errors += validate(item, props[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected property {key!r}")
            elif isinstance(extra, dict):
                errors += validate(item, extra, f"{path}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors
