"""Score systems on a split of the protocol and compare them with paired-bootstrap CIs.

A "system" is any (B, C) score matrix over the split's candidates. Every system is compared to a
reference system (SASRec by default) on the same rows, so differences come with honest intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recalign import metrics
from recalign.config import option
from recalign.data.dataset import Dataset, SplitArrays


@dataclass
class EvalConfig:
    split: str = option("test", "protocol split to evaluate on")
    metrics: tuple[str, ...] = option(metrics.STANDARD, "hr@1, hr@5, ndcg@5, ndcg@10, mrr")
    reference: str = option("sasrec", "system every other one is compared against")
    num_resamples: int = option(2000, "bootstrap resamples")
    confidence: float = option(0.95, "coverage of the bootstrap intervals")
    seed: int = option(0, "random baseline and bootstrap seed")


def random_scores(split: SplitArrays, seed: int) -> np.ndarray:
    """(B, C) uniform random scores (continuous, so no ties)."""
    return np.random.default_rng(seed).random(split.candidates.shape)


def popularity_scores(split: SplitArrays, popularity: np.ndarray) -> np.ndarray:
    """(B, C) train-split interaction counts of each candidate; ties are broken against the target."""
    return popularity[split.candidates].astype(np.float64)


def baseline_systems(data: Dataset, split: SplitArrays, seed: int) -> dict[str, np.ndarray]:
    return {"random": random_scores(split, seed), "popularity": popularity_scores(split, data.item_popularity())}


def evaluate(systems: dict[str, np.ndarray], split: SplitArrays, cfg: EvalConfig,
             notes: dict[str, str] | None = None) -> dict:
    """Per-system means with bootstrap CIs, and paired differences to `cfg.reference`
    (every system scored on all rows of `split`; see `summarise` for systems scored on a subset)."""
    per_example = {name: metrics.compute(scores, split.target_index, cfg.metrics) for name, scores in systems.items()}
    return summarise(per_example, cfg, rows={name: np.arange(len(split)) for name in systems}, notes=notes)


def summarise(per_example: dict[str, dict[str, np.ndarray]], cfg: EvalConfig, rows: dict[str, np.ndarray],
              notes: dict[str, str] | None = None) -> dict:
    """Aggregate per-example metric arrays. `rows[name]` = the split rows that system was scored on;
    the comparison to the reference uses the rows both systems share."""
    out: dict = {"split": cfg.split, "reference": cfg.reference, "confidence": cfg.confidence, "systems": {}}
    ref = per_example.get(cfg.reference)
    for name, values in per_example.items():
        entry: dict = {"num_rows": int(len(rows[name])), "note": (notes or {}).get(name, "")}
        for metric, arr in values.items():
            mean, low, high = metrics.bootstrap_ci(arr, cfg.num_resamples, cfg.confidence, cfg.seed)
            entry[metric] = {"mean": mean, "low": low, "high": high}
            if ref is not None and name != cfg.reference:
                shared, in_a, in_ref = np.intersect1d(rows[name], rows[cfg.reference], return_indices=True)
                if len(shared):
                    entry[metric]["vs_reference"] = metrics.paired_bootstrap(
                        arr[in_a], ref[metric][in_ref], cfg.num_resamples, cfg.confidence, cfg.seed)
        out["systems"][name] = entry
    return out


def markdown_table(result: dict, metric_names: tuple[str, ...] | None = None) -> str:
    """Systems as rows; each cell 'mean [low, high]'; a last column with the NDCG@10 difference to the reference."""
    systems = result["systems"]
    if not systems:
        return "(no systems)\n"
    first = next(iter(systems.values()))
    names = metric_names or tuple(k for k in first if isinstance(first[k], dict))
    pct = int(round(result["confidence"] * 100))
    key = "ndcg@10" if "ndcg@10" in names else names[-1]
    header = ["system", "rows", *names, f"Δ{key} vs {result['reference']} ({pct}% CI)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in systems.items():
        cells = [name + (f" ({entry['note']})" if entry.get("note") else ""), str(entry["num_rows"])]
        for metric in names:
            m = entry[metric]
            cells.append(f"{m['mean']:.4f} [{m['low']:.4f}, {m['high']:.4f}]")
        vs = entry[key].get("vs_reference")
        cells.append("reference" if name == result["reference"] else
                     (f"{vs['diff']:+.4f} [{vs['low']:+.4f}, {vs['high']:+.4f}]" if vs else "n/a"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

