"""PNG plots of a record with matplotlib: one figure per suite, one panel per metric, a bar per runtime and
case (median, with a min-max error bar)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from corejax.bench.report import SUITE_ORDER, unique_in_order


def plot_record(record: dict[str, Any], folder: Path) -> list[Path]:
    """Writes folder/bench_<suite>.png for every suite in the record; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fp = record["fingerprint"]
    subtitle = f"{fp['cpu']}, {fp['usable_cores']} cores, jax {fp['jax']} — {record['created']}"
    for suite in [s for s in SUITE_ORDER if any(e["suite"] == s for e in record["results"])]:
        entries = [e for e in record["results"] if e["suite"] == suite]
        metrics = unique_in_order(e["metric"] for e in entries)
        cols = 1 if suite == "micro" else min(2, len(metrics))
        rows = math.ceil(len(metrics) / cols)
        height = 0.35 * len(entries) + 1.5 if suite == "micro" else 3.2 * rows
        fig, axes = plt.subplots(rows, cols, figsize=(9 if suite == "micro" else 6.5 * cols, height), squeeze=False)
        for ax, name in zip(axes.flat, metrics):
            chosen = [e for e in entries if e["metric"] == name]
            cases, runtimes = unique_in_order(e["case"] for e in chosen), unique_in_order(e["runtime"] for e in chosen)
            width = 0.8 / len(runtimes)
            for j, runtime in enumerate(runtimes):
                pos, med, err = [], [], [[], []]
                for i, case in enumerate(cases):
                    e = next((x for x in chosen if x["case"] == case and x["runtime"] == runtime), None)
                    if e is not None:
                        pos.append(i + (j - (len(runtimes) - 1) / 2) * width)
                        med.append(e["median"])
                        err[0].append(e["median"] - e["min"])
                        err[1].append(e["max"] - e["median"])
                bar = ax.barh if suite == "micro" else ax.bar
                bar(pos, med, width, label=runtime, **({"xerr": err} if suite == "micro" else {"yerr": err}),
                    capsize=2)
            unit = chosen[0]["unit"]
            if suite == "micro":
                ax.set_yticks(range(len(cases)), cases, fontsize=7)
                ax.set_xscale("log")
                ax.set_xlabel(f"{name} ({unit}, lower is better)")
            else:
                ax.set_xticks(range(len(cases)), cases, fontsize=8, rotation=15 if len(cases) > 3 else 0)
                ax.set_title(f"{name} ({unit}, {chosen[0]['better']} is better)", fontsize=9)
            if len(runtimes) > 1:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        fig.suptitle(f"corejax bench: {suite}\n{subtitle}", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))  # room for the two-line title
        path = folder / f"bench_{suite}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
