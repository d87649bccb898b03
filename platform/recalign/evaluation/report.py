"""The evaluation's reports: eval/metrics.json and metrics.md (the table), and metrics.png (the plot)."""

from __future__ import annotations

import numpy as np

from recalign import io
from recalign.evaluation.compare import comparisons_table
from recalign.plots import pyplot, save_png
from recalign.systems import markdown_table


def write_report(result: dict, eval_dir: str, title: str) -> str:
    """eval/metrics.json and eval/metrics.md (atomic); returns the markdown (tables)."""
    table = (markdown_table(result) + free_generation_table(result)
             + comparisons_table(result.get("comparisons", []), result["confidence"]))
    io.write_json(result, io.join(eval_dir, "metrics.json"))
    io.write_text(f"# {title}\n\n{table}", io.join(eval_dir, "metrics.md"))
    return table


def free_generation_table(summary: dict) -> str:
    """ValidRatio and HR@1 over all rows and over valid rows of the systems that answered in free text."""
    rows = [(n, e["free_generation"]) for n, e in summary["systems"].items() if "free_generation" in e]
    if not rows:
        return ""
    lines = ["", "Free generation (greedy answer parsed for a letter):", "",
             "| system | ValidRatio | HR@1 (all rows) | HR@1 (valid rows) |", "|---|---|---|---|"]
    for name, fg in rows:
        valid_rows = "-" if fg["hr@1_valid_rows"] != fg["hr@1_valid_rows"] else f"{fg['hr@1_valid_rows']:.4f}"  # NaN
        lines.append(f"| {name} | {fg['valid_ratio']:.3f} | {fg['hr@1_all_rows']:.4f} | {valid_rows} |")
    return "\n".join(lines) + "\n"


def plot_systems(summary: dict, uri: str, metric: str = "ndcg@10") -> None:
    """Left: each system's `metric` with its CI. Middle: the paired difference to the reference system on the
    rows both were scored on, with its CI: systems scored on a user subset are compared where they overlap.
    Right (when the run has them): the comparisons the methods are about (`recalign.evaluation.compare`)."""
    plt = pyplot()
    systems = summary["systems"]
    names = list(systems)
    labels = [f"{n} ({systems[n]['num_rows']})" for n in names]
    comparisons = [c for c in summary.get("comparisons", []) if c["metric"] == metric]
    height = 0.45 * max(len(names), len(comparisons)) + 1.5
    if comparisons:
        fig, (left, right, third) = plt.subplots(1, 3, figsize=(18, height))
        _plot_comparisons(third, comparisons, metric)
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, height))
    means = np.array([systems[n][metric]["mean"] for n in names])
    errors = [means - np.array([systems[n][metric]["low"] for n in names]),
              np.array([systems[n][metric]["high"] for n in names]) - means]
    left.barh(range(len(names)), means, xerr=errors, color="#4c72b0", capsize=3)
    left.set_xlabel(f"{metric} ({int(summary['confidence'] * 100)}% CI)")
    left.set_yticks(range(len(names)), labels, fontsize=8)
    left.invert_yaxis()
    vs = [systems[n][metric].get("vs_reference") or {"diff": 0.0, "low": 0.0, "high": 0.0} for n in names]
    diffs = np.array([v["diff"] for v in vs])
    colors = ["#999999" if n == summary["reference"] else ("#55a868" if v["low"] > 0 else "#c44e52" if v["high"] < 0
              else "#8c8c8c") for n, v in zip(names, vs)]
    right.barh(range(len(names)), diffs, xerr=[diffs - [v["low"] for v in vs], [v["high"] for v in vs] - diffs],
               color=colors, capsize=3)
    right.axvline(0.0, color="black", linewidth=0.8)
    right.set_yticks(range(len(names)), [""] * len(names))
    right.invert_yaxis()
    right.set_xlabel(f"Δ{metric} vs {summary['reference']}, paired on shared rows (CI)")
    fig.suptitle(f"{summary['split']} split; rows scored in parentheses")
    fig.tight_layout()
    save_png(fig, uri)


def _plot_comparisons(ax, comparisons: list[dict], metric: str) -> None:
    labels = [f"{c['system']} vs {c['baseline'].removeprefix('ka-sasrec + ').removeprefix('llm ')}"
              for c in comparisons]
    diffs = np.array([c["diff"] for c in comparisons])
    colors = ["#55a868" if c["low"] > 0 else "#c44e52" if c["high"] < 0 else "#8c8c8c" for c in comparisons]
    ax.barh(range(len(comparisons)), diffs, color=colors, capsize=3,
            xerr=[diffs - [c["low"] for c in comparisons], [c["high"] for c in comparisons] - diffs])
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(comparisons)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ{metric}: the methods' comparisons (paired CI)")
