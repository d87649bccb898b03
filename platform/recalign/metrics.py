"""Ranking metrics over candidate lists, per example, plus paired-bootstrap confidence intervals.

`scores` is (B, C): one score per candidate, higher is better. `target` is (B,): the column of the
true item, or -1 when it is not among the candidates (retrieval mode), which scores 0 everywhere.

Ties count against the target: its rank is 1 + the number of *other* candidates scoring at least as
high. A model that scores every candidate equally gets rank C, the worst, never a lucky rank 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def target_rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) 1-based pessimistic rank of the target; 0 where target == -1 (absent)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    target = torch.as_tensor(target, dtype=torch.long)
    if scores.dim() != 2 or target.shape != scores.shape[:1]:
        raise ValueError(f"scores must be (B, C) and target (B,), got {tuple(scores.shape)} and {tuple(target.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    present = target >= 0
    if (target >= scores.shape[1]).any():
        raise ValueError(f"target column out of range for C={scores.shape[1]}")
    target_score = scores.gather(1, target.clamp(min=0).unsqueeze(1))  # (B, 1)
    at_least = (scores >= target_score).sum(dim=1)  # includes the target itself
    return torch.where(present, at_least, torch.zeros_like(at_least))


def hr_at_k(scores: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) 1.0 if the target ranks in the top k, else 0.0."""
    rank = target_rank(scores, target)
    return ((rank >= 1) & (rank <= k)).double()


def ndcg_at_k(scores: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) 1 / log2(rank + 1) if rank <= k else 0 (one relevant item, so IDCG = 1)."""
    rank = target_rank(scores, target).double()
    gain = 1.0 / torch.log2(rank + 1.0)
    return torch.where((rank >= 1) & (rank <= k), gain, torch.zeros_like(gain))


def mrr(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) 1 / rank of the target (0 where absent)."""
    rank = target_rank(scores, target).double()
    return torch.where(rank >= 1, 1.0 / rank.clamp(min=1), torch.zeros_like(rank))


STANDARD = ("hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr")


def compute(scores: torch.Tensor, target: torch.Tensor, names: tuple[str, ...] = STANDARD) -> dict[str, np.ndarray]:
    """Per-example values for metric names like "hr@5", "ndcg@10", "mrr"."""
    out = {}
    for name in names:
        if name == "mrr":
            values = mrr(scores, target)
        else:
            kind, _, k = name.partition("@")
            fn = {"hr": hr_at_k, "ndcg": ndcg_at_k}.get(kind)
            if fn is None or not k.isdigit():
                raise ValueError(f"unknown metric {name!r}")
            values = fn(scores, target, int(k))
        out[name] = values.numpy()
    return out


def bootstrap_ci(values: np.ndarray, num_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(num_resamples, len(values)))
    means = values[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    return float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, num_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, float]:
    """Difference mean(a) - mean(b) of two systems scored on the same examples.

    Resamples examples (not systems) so the pairing is kept. Returns the difference, its
    percentile interval and a two-sided bootstrap p-value (share of resampled differences on
    the other side of zero, doubled).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs two (N,) arrays of equal length, got {a.shape} and {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(num_resamples, len(diff)))
    means = diff[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    observed = float(diff.mean())
    if observed >= 0:
        tail = float((means <= 0).mean())
    else:
        tail = float((means >= 0).mean())
    return {"diff": observed, "low": float(np.quantile(means, alpha)), "high": float(np.quantile(means, 1 - alpha)),
            "p_value": min(1.0, 2 * tail)}


def random_expectation(num_candidates: int, k: int) -> dict[str, float]:
    """Expected HR@k and NDCG@k of a uniformly random ranking of C candidates (one relevant)."""
    hr = min(k, num_candidates) / num_candidates
    ndcg = sum(1.0 / math.log2(r + 1) for r in range(1, min(k, num_candidates) + 1)) / num_candidates
    return {f"hr@{k}": hr, f"ndcg@{k}": ndcg}
