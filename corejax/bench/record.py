"""Bench records: building result entries, saving named baselines, and comparing two records.

A regression is a change in the worse direction larger than the noise of either run: the tolerance for
an entry is max(threshold, half the relative min-max spread of the old run + the same of the new run), so
a noisy metric needs a larger change before it is flagged, and a tight one is flagged at `threshold`.
"""

from __future__ import annotations

import datetime
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from corejax.bench.schema import SCHEMA_VERSION, validate

DEFAULT_THRESHOLD = 0.05  # relative change below which nothing is flagged, however tight the runs
FINGERPRINT_KEYS = ("cpu", "cores", "usable_cores", "jax", "jaxlib", "backend", "corejax")


def metric(suite: str, case: str, runtime: str, name: str, samples: Sequence[float], unit: str,
           better: str = "higher") -> dict[str, Any]:
    """One result entry: median, min and max of `samples` (kept too, so later tools can re-summarise)."""
    values = [float(x) for x in samples]
    if not values:
        raise ValueError(f"{suite}/{case}/{runtime}/{name}: no samples")
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower'; got {better!r}")
    return {"suite": suite, "case": case, "runtime": runtime, "metric": name, "unit": unit, "better": better,
            "median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "samples": values}


def new_record(command: str, config: dict[str, Any], fingerprint: dict[str, Any]) -> dict[str, Any]:
    created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    return {"schema_version": SCHEMA_VERSION, "created": created, "command": command, "config": dict(config),
            "fingerprint": dict(fingerprint), "runtimes": {}, "skipped": [], "results": []}


def baselines_dir() -> Path:
    from corejax import hub

    return hub.cache_dir() / "bench"


def record_path(name: str) -> Path:
    """A baseline name (saved under the corejax cache, in bench/NAME.json) or a path to a .json file."""
    if name.endswith(".json") or "/" in name:
        return Path(name).expanduser()
    return baselines_dir() / f"{name}.json"


def save_record(record: dict[str, Any], name_or_path: str) -> Path:
    errors = validate(record)
    if errors:
        raise ValueError("the record does not match its schema:\n  " + "\n  ".join(errors[:20]))
    path = record_path(name_or_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return path


def load_record(name_or_path: str) -> dict[str, Any]:
    from corejax.errors import InvalidParameterError

    path = record_path(name_or_path)
    if not path.exists():
        saved = sorted(p.stem for p in baselines_dir().glob("*.json")) if baselines_dir().exists() else []
        raise InvalidParameterError(f"no bench record {name_or_path!r} at {path}; saved baselines: "
                                    f"{', '.join(saved) or 'none'} (make one with --save NAME)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidParameterError(f"{path} is not a JSON bench record ({e}); save a new one with --save") from None
    errors = validate(record)
    if errors:
        raise InvalidParameterError(f"{path} does not match the bench record schema (first problem: {errors[0]})")
    return record


def _key(entry: dict[str, Any]) -> tuple[str, str, str, str]:
    return entry["suite"], entry["case"], entry["runtime"], entry["metric"]


def _spread(entry: dict[str, Any]) -> float:
    med = abs(entry["median"])
    return (entry["max"] - entry["min"]) / (2 * med) if med else 0.0


def compare(old: dict[str, Any], new: dict[str, Any], threshold: float = DEFAULT_THRESHOLD) -> list[dict[str, Any]]:
    """One row per result entry in either record: status is 'regression', 'improvement', 'same', 'new'
    (only in `new`), 'missing' (only in `old`) or 'incomparable' (a zero median in `old`)."""
    before = {_key(e): e for e in old["results"]}
    after = {_key(e): e for e in new["results"]}
    rows = []
    for key in list(before) + [k for k in after if k not in before]:
        o, n = before.get(key), after.get(key)
        row = {"suite": key[0], "case": key[1], "runtime": key[2], "metric": key[3],
               "unit": (n or o)["unit"], "old": o and o["median"], "new": n and n["median"], "change": None,
               "tolerance": None}
        if o is None or n is None:
            row["status"] = "new" if o is None else "missing"
        elif o["median"] == 0:
            row["status"] = "same" if n["median"] == 0 else "incomparable"
        else:
            change = n["median"] / o["median"] - 1.0
            tolerance = max(threshold, _spread(o) + _spread(n))
            worse = -change if n["better"] == "higher" else change
            row.update(change=change, tolerance=tolerance,
                       status="regression" if worse > tolerance else "improvement" if -worse > tolerance
                       else "same")
        rows.append(row)
    return rows


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Fingerprint fields that differ between two records: their numbers may not be comparable."""
    a, b = old.get("fingerprint", {}), new.get("fingerprint", {})
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in FINGERPRINT_KEYS if a.get(k) != b.get(k)]


def regressions(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "regression"]


def write_rows(path: str | Path, script: str, argv: Sequence[str], rows: list[dict[str, Any]]) -> Path:
    """A stand-alone benchmark's rows (benchmarks/*.py) as JSON beside the command that made them and this
    machine's fingerprint; prints where it went."""
    from corejax.bench.machine import fingerprint

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": f"python {script} " + " ".join(argv), "fingerprint": fingerprint(),
                               "rows": rows}, indent=2))
    print(f"wrote {out}")
    return out
