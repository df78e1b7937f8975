"""Terminal tables: one per suite (rows: case and metric; columns: runtimes, then corejax ÷ each peer), and
the comparison of two records."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# How a line says a skipped entry's status; "missing" and "unsupported" read as "skipped".
STATUS_WORDS = {"crashed": "crashed", "timeout": "timed out", "failed": "failed"}
SUITE_ORDER = ("machine", "generation", "embedding", "ipc", "tokenizer", "concurrency", "speculative", "micro")


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def cell(entry: dict[str, Any]) -> str:
    if entry["n"] == 1 or entry["min"] == entry["max"]:
        return _num(entry["median"])
    return f"{_num(entry['median'])} [{_num(entry['min'])}-{_num(entry['max'])}]"


def _render(header: list[str], rows: list[list[str]], labels: int = 3) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def fmt(row: list[str]) -> str:  # the first `labels` columns left, figures right
        return "  ".join(c.ljust(w) if i < labels else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def unique_in_order(xs: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def suite_rows(entries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one suite: case, metric, unit, each runtime's cell, corejax ÷ each peer."""
    runtimes = unique_in_order(e["runtime"] for e in entries)
    by_key = {(e["case"], e["metric"], e["runtime"]): e for e in entries}
    peers = [r for r in runtimes if not r.startswith("corejax") and r not in ("machine", "numpy")]
    has_corejax = "corejax" in runtimes
    header = ["case", "metric", "unit"] + runtimes + ([f"corejax/{p}" for p in peers] if has_corejax else [])
    rows = []
    for case, name in unique_in_order((e["case"], e["metric"]) for e in entries):
        some = next(by_key[(case, name, r)] for r in runtimes if (case, name, r) in by_key)
        row = [case, name, some["unit"]]
        row += [cell(by_key[(case, name, r)]) if (case, name, r) in by_key else "-" for r in runtimes]
        if has_corejax:
            mine = by_key.get((case, name, "corejax"))
            for p in peers:
                theirs = by_key.get((case, name, p))
                ok = mine is not None and theirs is not None and theirs["median"]
                row.append(f"{mine['median'] / theirs['median']:.2f}x" if ok else "-")
        rows.append(row)
    return header, rows


def _suites(record: dict[str, Any]) -> list[str]:
    suites = unique_in_order(e["suite"] for e in record["results"])
    return sorted(suites, key=lambda s: SUITE_ORDER.index(s) if s in SUITE_ORDER else 99)


def _machine_line(fp: dict[str, Any]) -> str:
    return (f"corejax {fp['corejax']} | {fp['cpu']} | {fp['usable_cores']}/{fp['cores']} cores | "
            f"{' '.join(fp['cpu_flags'])} | jax {fp['jax']} ({fp['backend']})"
            + (f" | load {fp['load_average'][0]}" if fp.get("load_average") else ""))


def record_table(record: dict[str, Any]) -> str:
    lines = [_machine_line(record["fingerprint"])]
    for suite in _suites(record):
        lines += ["", f"== {suite}: median [min-max] =="]
        lines += _render(*suite_rows([e for e in record["results"] if e["suite"] == suite]))
    if record["skipped"]:
        lines += ["", "== not measured =="]
        lines += _render(["suite", "runtime", "status", "what happened"],
                         [[s["suite"], s["runtime"], s.get("status", "missing"), s["reason"]]
                          for s in record["skipped"]], labels=4)
        for s in record["skipped"]:
            if s.get("advice"):
                lines.append(f"what to do about {s['runtime']} ({s['suite']}): " + s["advice"].replace("\n", "\n  "))
    return "\n".join(lines)


def comparison_table(rows: list[dict[str, Any]], differences: list[str]) -> str:
    lines = [f"note: the fingerprints differ ({'; '.join(differences)})"] if differences else []
    table = []
    for r in rows:
        if r["status"] == "same":  # counted below; only what changed is listed
            continue
        change = "-" if r["change"] is None else f"{r['change'] * 100:+.1f}%"
        tol = "-" if r["tolerance"] is None else f"±{r['tolerance'] * 100:.1f}%"
        old = "-" if r["old"] is None else _num(r["old"])
        new = "-" if r["new"] is None else _num(r["new"])
        flag = r["status"].upper() if r["status"] == "regression" else r["status"]
        table.append([f"{r['suite']}: {r['case']}", r["metric"], r["runtime"], old, new, change, tol, flag])
    if table:
        lines += _render(["case", "metric", "runtime", "old", "new", "change", "noise", "status"], table)
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("regression", "improvement", "same", "new", "missing", "incomparable")}
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items() if v).replace("same", "unchanged within the noise"))
    return "\n".join(lines)


def markdown(record: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """The record as a Markdown page (benchmarks/RESULTS.md): command, fingerprint, set-up, one table per suite
    and its plot (`plots`: suite -> relative path of its PNG)."""
    fp, plots = record["fingerprint"], plots or {}
    mem = f"{fp['memory_bytes'] / 2**30:.0f} GiB" if fp.get("memory_bytes") else "unknown memory"
    lines = [
        "# corejax bench: the latest full run", "",
        "Written by `corejax bench --markdown` (again from a saved record: `corejax bench --input RECORD "
        "--plots DIR --markdown PATH`). Every figure is the median [min-max] of the measured repetitions; "
        "`corejax/X` is corejax's median over X's (above 1: faster for rates, slower for times and sizes). "
        "Definitions: docs/BENCHMARKS.md.", "",
        f"Command: `{record['command']}`  ", f"Started: {record['created']}", "",
        "## Machine", "",
        f"- CPU: {fp['cpu']} ({fp['machine']}), {fp['usable_cores']} usable of {fp['cores']} cores, {mem}",
        f"- flags: {' '.join(fp['cpu_flags']) or 'none recorded'}",
        f"- {fp['system']}, Python {fp['python']}, numpy {fp['numpy']}, jax {fp['jax']} / jaxlib {fp['jaxlib']} "
        f"(backend {fp['backend']}), corejax {fp['corejax']}",
        "- peers: " + ", ".join(f"{k} {v}" for k, v in fp["packages"].items() if v),
    ]
    if fp.get("load_average"):
        end = fp.get("load_average_end")
        lines.append(f"- load average (1/5/15 min) at the start: {fp['load_average']}"
                     + (f", at the end: {end}" if end else "") + " (other work on the machine adds noise)")
    lines += ["", "## Runtimes", ""]
    lines += [f"- **{name}** ({suite}): " + ", ".join(f"{k}={v}" for k, v in details.items())
              for name, suites in record["runtimes"].items() for suite, details in suites.items()]
    for s in record["skipped"]:
        head = STATUS_WORDS.get(s.get("status", "missing"), "skipped")
        lines.append(f"- {head} {s['runtime']} ({s['suite']}): {s['reason']}"
                     + (f"; what to do: {s['advice']}".replace("\n", " ") if s.get("advice") else ""))
    for suite in _suites(record):
        header, rows = suite_rows([e for e in record["results"] if e["suite"] == suite])
        lines += ["", f"## {suite}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        if suite in plots:
            lines += ["", f"![{suite}]({plots[suite]})"]
    return "\n".join(lines) + "\n"
