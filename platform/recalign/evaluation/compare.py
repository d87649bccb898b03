"""The comparisons the methods are about, with paired bootstrap CIs on the users both systems were scored on:

- each aligned knowledge policy against the base model's knowledge (does alignment help KA-SASRec?);
- SFT against zero-shot, and each SFT+<loss> against SFT and against zero-shot (does training help the
  re-ranker?); fusion against each re-ranker (does SASRec's score help the LLM?);
- DMPO and S-DPO against DPO, on both paths (do K negatives help over best vs worst?).
"""

from __future__ import annotations

import numpy as np

from recalign import metrics
from recalign.systems import EvalConfig

METRICS = ("ndcg@10", "hr@1")


def comparison_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(system, baseline) pairs among the system names the evaluation produced, in a fixed order."""
    present = set(names)
    pairs = []
    for name in names:
        if name.startswith("ka-sasrec + ") and name != "ka-sasrec + base knowledge":
            pairs.append((name, "ka-sasrec + base knowledge"))
        if name == "llm sft":
            pairs.append((name, "llm zero-shot"))
        if name.startswith("llm sft+"):
            pairs.append((name, "llm sft"))
        if name.startswith("llm ") and name != "llm zero-shot" and name != "llm sft":
            pairs.append((name, "llm zero-shot"))
    if "fusion" in present:
        pairs += [("fusion", n) for n in names if n.startswith("llm ")]
    for loss in ("dmpo", "sdpo"):
        pairs += [(f"llm sft+{loss}", "llm sft+dpo"), (f"ka-sasrec + {loss} knowledge", "ka-sasrec + dpo knowledge")]
    return [(a, b) for a, b in pairs if a in present and b in present]


def compare_systems(per_example: dict[str, dict[str, np.ndarray]], rows: dict[str, np.ndarray],
                    cfg: EvalConfig) -> list[dict]:
    """One record per comparison and metric: {system, baseline, metric, rows, diff, low, high, p_value}."""
    out = []
    for system, baseline in comparison_pairs(list(per_example)):
        shared, in_a, in_b = np.intersect1d(rows[system], rows[baseline], return_indices=True)
        if not len(shared):
            continue
        for metric in METRICS:
            if metric not in per_example[system] or metric not in per_example[baseline]:
                continue
            stats = metrics.paired_bootstrap(per_example[system][metric][in_a], per_example[baseline][metric][in_b],
                                             cfg.num_resamples, cfg.confidence, cfg.seed)
            out.append({"system": system, "baseline": baseline, "metric": metric, "rows": int(len(shared)), **stats})
    return out


def comparisons_table(comparisons: list[dict], confidence: float) -> str:
    """The comparisons as markdown: one row per (system, baseline), a column per metric."""
    if not comparisons:
        return ""
    pct = int(round(confidence * 100))
    pairs = list(dict.fromkeys((c["system"], c["baseline"], c["rows"]) for c in comparisons))
    lines = ["", f"Comparisons the methods are about (paired on the users both were scored on, {pct}% CI):", "",
             "| system | vs | rows | " + " | ".join(f"Δ{m}" for m in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for system, baseline, n in pairs:
        cells = []
        for metric in METRICS:
            c = next((c for c in comparisons if (c["system"], c["baseline"], c["metric"]) == (system, baseline,
                                                                                               metric)), None)
            cells.append(f"{c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]" if c else "n/a")
        lines.append(f"| {system} | {baseline} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
