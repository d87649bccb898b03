"""Score fusion: SASRec's scores plus `w` times an LLM re-ranker's letter logits, each standardised per row
(zero mean, unit spread over the row's C candidates, so `w` means the same for every user and model).

`w` is chosen on validation users only, on a grid that holds 0 (SASRec itself), so a re-ranker that adds
nothing leaves SASRec's ranking as it is; ties go to the smaller weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recalign import metrics
from recalign.config import option


@dataclass
class FusionConfig:
    weights: list[float] = option(factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0],
                                  help="grid of w searched on the validation users (0 = SASRec alone)")
    metric: str = option("ndcg@10", "validation metric w maximises, and the one the best re-ranker is chosen by")

    def __post_init__(self) -> None:
        if not self.weights or any(w < 0 or not np.isfinite(w) for w in self.weights):
            raise ValueError(f"weights must be a non-empty list of finite values >= 0, got {self.weights}")
        if 0.0 not in self.weights:
            raise ValueError(f"weights must hold 0 (SASRec alone), got {self.weights}")


def standardise(scores: np.ndarray) -> np.ndarray:
    """(B, C) -> each row minus its mean, over its standard deviation (a constant row becomes zeros)."""
    scores = np.asarray(scores, dtype=np.float64)
    centred = scores - scores.mean(axis=1, keepdims=True)
    spread = centred.std(axis=1, keepdims=True)
    return np.divide(centred, spread, out=np.zeros_like(centred), where=spread > 0)


def fuse(sasrec: np.ndarray, llm: np.ndarray, weight: float) -> np.ndarray:
    """(B, C) standardised SASRec scores + weight * standardised LLM scores."""
    if np.shape(sasrec) != np.shape(llm):
        raise ValueError(f"SASRec scores {np.shape(sasrec)} and LLM scores {np.shape(llm)} differ in shape")
    return standardise(sasrec) + weight * standardise(llm)


def choose_weight(sasrec: np.ndarray, llm: np.ndarray, target_index: np.ndarray,
                  cfg: FusionConfig) -> tuple[float, dict[float, float]]:
    """The grid weight with the best mean `cfg.metric` on these (validation) rows, the smallest among ties,
    and the metric of every weight."""
    grid = {float(w): float(metrics.compute(fuse(sasrec, llm, w), target_index, (cfg.metric,))[cfg.metric].mean())
            for w in sorted(cfg.weights)}
    best = max(grid.values())
    return min(w for w, value in grid.items() if value >= best - 1e-12), grid
