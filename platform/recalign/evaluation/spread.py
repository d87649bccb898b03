"""The spread between runs that differ only in their seed, beside each run's bootstrap CI.

A bootstrap CI says how much a number would move on other users; the seed spread says how much it moves
when the same users are scored by models trained and sampled again. A difference inside either is not a
finding. `spread_table` reads the `metrics.json` of each run (same protocol, same evaluation users).
"""

from __future__ import annotations

import numpy as np

from recalign import io
from recalign.data.loaders import DataError
from recalign.errors import MissingInputError


def read_summaries(run_dirs: dict[str, str]) -> dict[str, dict]:
    """{label: eval/metrics.json of that run dir}; a clear error names a run that has not been evaluated."""
    out = {}
    for label, run_dir in run_dirs.items():
        uri = io.join(run_dir, "eval", "metrics.json")
        if not io.exists(uri):
            raise MissingInputError(f"{uri}: missing; evaluate run {label!r} first")
        out[label] = io.read_json(uri)
    return out


def spread_rows(summaries: dict[str, dict], metric: str = "ndcg@10") -> list[dict]:
    """Per system in every run: its value per run, the range across runs and the widest 95% CI of a run.

    Systems scored on different rows in different runs are refused: the spread would mix users."""
    labels = list(summaries)
    if len(labels) < 2:
        raise ValueError(f"a seed spread needs at least 2 runs, got {len(labels)}")
    common = [n for n in summaries[labels[0]]["systems"] if all(n in s["systems"] for s in summaries.values())]
    rows = []
    for name in common:
        entries = [summaries[label]["systems"][name] for label in labels]
        counts = {e["num_rows"] for e in entries}
        if len(counts) != 1:
            raise DataError(f"{name}: scored on {sorted(counts)} rows in different runs; use the same eval settings")
        values = np.array([e[metric]["mean"] for e in entries])
        ci = max(e[metric]["high"] - e[metric]["low"] for e in entries)
        rows.append({"system": name, "rows": counts.pop(), "values": dict(zip(labels, values.tolist())),
                     "range": float(values.max() - values.min()), "std": float(values.std(ddof=1)),
                     "ci_width": float(ci)})
    return rows


def comparison_spread(summaries: dict[str, dict], metric: str = "ndcg@10") -> list[dict]:
    """Per comparison (system vs baseline) in every run: the paired difference per run, and whether its CI
    excludes 0 in that run."""
    labels = list(summaries)

    def by_key(summary: dict) -> dict:
        return {(c["system"], c["baseline"]): c for c in summary.get("comparisons", []) if c["metric"] == metric}

    keyed = [by_key(summaries[label]) for label in labels]
    out = []
    for key in keyed[0]:
        if all(key in k for k in keyed):
            runs = [k[key] for k in keyed]
            out.append({"system": key[0], "baseline": key[1],
                        "diffs": {label: c["diff"] for label, c in zip(labels, runs)},
                        "significant": {label: bool(c["low"] > 0 or c["high"] < 0) for label, c in zip(labels, runs)}})
    return out


def spread_table(summaries: dict[str, dict], metric: str = "ndcg@10") -> str:
    """Markdown: the systems with their value per run, range, sample sd and widest CI; then the comparisons'
    differences per run (* where that run's CI excludes 0)."""
    labels = list(summaries)
    lines = ["| system | rows | " + " | ".join(labels) + " | range | sd | widest 95% CI width |",
             "|---|---|" + "---|" * (len(labels) + 3)]
    for r in spread_rows(summaries, metric):
        cells = " | ".join(f"{r['values'][label]:.4f}" for label in labels)
        lines.append(f"| {r['system']} | {r['rows']} | {cells} | {r['range']:.4f} | {r['std']:.4f} | "
                     f"{r['ci_width']:.4f} |")
    comparisons = comparison_spread(summaries, metric)
    if comparisons:
        lines += ["", f"Paired Δ{metric} per run (* = that run's CI excludes 0):", "",
                  "| system | vs | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
        for c in comparisons:
            cells = " | ".join(f"{c['diffs'][label]:+.4f}{'*' if c['significant'][label] else ''}" for label in labels)
            lines.append(f"| {c['system']} | {c['baseline']} | {cells} |")
    return "\n".join(lines) + "\n"
