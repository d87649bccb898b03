"""Rewards: how much each sampled analysis helps the KA recommender rank the user's next item.

Target: the `train` example (the user's last *training* interaction, history = the H items before
it, the same history the knowledge prompt showed). KA-SASRec was trained on each train sequence
minus that item, so the reward is an out-of-sample prediction; validation and test items are
never read here (the split is fixed to "train" inside, not passed in).

Two rewards, `kind` choosing which one the pairs are built from (both are always recorded):
- `logp` (default): the log-probability of the target over the whole catalogue. Continuous, so the N
  analyses of a user almost never tie, and a gap in it is a gap in how likely the model finds the item.
- `ndcg10`: NDCG@10 of the target among its 20 candidates + tie_break * p(target), p the softmax of the
  candidate scores. `tie_break` is below the smallest gap between NDCG@10 values of adjacent ranks, so
  sorting by it sorts by NDCG@10 first. NDCG@10 of one target among 20 saturates: most users' analyses
  tie, and the tie-break separates them by little.
The summary reports, for each kind, how many users have analyses that differ by a usable margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from recalign import metrics
from recalign.config import option
from recalign.data.dataset import Dataset
from recalign.recsys.ka_sasrec import KASASRec
from recalign.recsys.ka_train import catalogue_logp, score_with_knowledge
from recalign.recsys.knowledge import KnowledgeTable

REWARD_K = 10
# Smallest difference between NDCG@10 values of two adjacent ranks (ranks 10 and 9).
MIN_NDCG_GAP = 1 / math.log2(REWARD_K) - 1 / math.log2(REWARD_K + 1)
REWARD_SPLIT = "train"

REWARDS_SCHEMA = pa.schema([
    ("user_idx", pa.int32()), ("sample_idx", pa.int32()), ("target", pa.int32()), ("target_index", pa.int32()),
    ("target_rank", pa.int32()), ("ndcg10", pa.float64()), ("logp_target", pa.float64()),
    ("logp_catalogue", pa.float64()), ("reward", pa.float64()),
    ("ndcg10_no_knowledge", pa.float64()), ("logp_target_no_knowledge", pa.float64()),
    ("logp_catalogue_no_knowledge", pa.float64()),
])
KINDS = ("logp", "ndcg10")
# Margins at which the summary counts the users whose best and worst analyses differ, per reward kind.
MARGINS = {"logp": (1e-3, 1e-2, 0.05, 0.1, 0.3), "ndcg10": (1e-4, 1e-3, 1e-2, 0.1, 0.3)}


@dataclass
class RewardConfig:
    kind: str = option("logp", "the reward pairs are built from: logp (log-probability of the target over the whole "
                               "catalogue) | ndcg10 (NDCG@10 among the candidates + tie-break)")
    tie_break: float = option(0.01, "ndcg10: weight of p(target) added to NDCG@10; must stay below 0.01197 (the "
                                    "adjacent-rank gap)")
    batch_size: int = option(512, "rows scored per forward pass")

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not 0.0 <= self.tie_break < MIN_NDCG_GAP:
            raise ValueError(f"tie_break must be in [0, {MIN_NDCG_GAP:.5f}) so it only breaks NDCG@10 ties, "
                             f"got {self.tie_break}")


def target_logp(scores: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """(B,) log-softmax of the target's score among its candidates. scores (B, C), target_index (B,)."""
    logp = torch.log_softmax(torch.as_tensor(scores, dtype=torch.float64), dim=1)
    return logp.gather(1, torch.as_tensor(target_index, dtype=torch.long).unsqueeze(1)).squeeze(1).numpy()


def combine(ndcg10: np.ndarray, logp_target: np.ndarray, tie_break: float) -> np.ndarray:
    """reward (B,) = ndcg10 + tie_break * exp(logp_target)."""
    return np.asarray(ndcg10, dtype=np.float64) + tie_break * np.exp(np.asarray(logp_target, dtype=np.float64))


def compute_rewards(model: KASASRec, data: Dataset, knowledge: KnowledgeTable, cfg: RewardConfig) -> pa.Table:
    """One row per (user, present sample): the KA model scores the user's `train` target fed that sample's
    embedding, among the candidates and over the whole catalogue. Also scores each user once without knowledge."""
    split = data.split(REWARD_SPLIT)
    if np.any(split.target_index < 0):
        raise ValueError(f"{data.data_dir}: train examples without their target among the candidates")
    row_of_user = np.full(knowledge.present.shape[0], -1, dtype=np.int64)
    row_of_user[split.user_idx] = np.arange(len(split))
    users, samples = np.nonzero(knowledge.present)  # sorted by (user, sample)
    rows = row_of_user[users]
    if np.any(rows < 0):
        raise ValueError(f"embeddings for users without a train example: {sorted(set(users[rows < 0].tolist()))[:5]}")
    history, candidates, target = split.history[rows], split.candidates[rows], split.target_index[rows]
    vectors = knowledge.vectors[users, samples]

    scores = score_with_knowledge(model, history, candidates, vectors, np.ones(len(rows), dtype=bool),
                                  cfg.batch_size)  # (R, C)
    ndcg10 = metrics.ndcg_at_k(scores, target, REWARD_K).numpy()
    logp = target_logp(scores, target)
    rank = metrics.target_rank(scores, target).numpy()
    logp_all = catalogue_logp(model, history, split.target[rows], vectors, cfg.batch_size)

    user_rows = np.unique(rows)  # one no-knowledge score per user
    plain = score_with_knowledge(model, split.history[user_rows], split.candidates[user_rows], None, None,
                                 cfg.batch_size)
    plain_ndcg = metrics.ndcg_at_k(plain, split.target_index[user_rows], REWARD_K).numpy()
    plain_logp = target_logp(plain, split.target_index[user_rows])
    plain_all = catalogue_logp(model, split.history[user_rows], split.target[user_rows], None, cfg.batch_size)
    at = np.searchsorted(user_rows, rows)
    reward = logp_all if cfg.kind == "logp" else combine(ndcg10, logp, cfg.tie_break)
    return pa.table({
        "user_idx": pa.array(users.astype(np.int32)), "sample_idx": pa.array(samples.astype(np.int32)),
        "target": pa.array(split.target[rows].astype(np.int32)), "target_index": pa.array(target.astype(np.int32)),
        "target_rank": pa.array(rank.astype(np.int32)), "ndcg10": pa.array(ndcg10.astype(np.float64)),
        "logp_target": pa.array(logp), "logp_catalogue": pa.array(logp_all), "reward": pa.array(reward),
        "ndcg10_no_knowledge": pa.array(plain_ndcg[at].astype(np.float64)),
        "logp_target_no_knowledge": pa.array(plain_logp[at]), "logp_catalogue_no_knowledge": pa.array(plain_all[at]),
    }, schema=REWARDS_SCHEMA)


QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def summarise_rewards(rewards: pa.Table, kind: str = "logp", num_resamples: int = 2000, seed: int = 0) -> dict:
    """Per-user spread of the rewards, how often best != worst, how many users each reward kind leaves with a
    usable pair at each margin, and whether knowledge helps on the target."""
    frame = rewards.to_pandas()
    if frame.empty:
        raise ValueError("rewards table is empty")
    frame["ndcg10_tiebreak"] = frame["reward"] if kind == "ndcg10" else combine(frame["ndcg10"], frame["logp_target"],
                                                                                RewardConfig.tie_break)
    per_user = frame.groupby("user_idx")
    columns = {"logp": "logp_catalogue", "ndcg10": "ndcg10_tiebreak"}
    spread = {col: (per_user[col].max() - per_user[col].min()).to_numpy()
              for col in ("reward", "ndcg10", "logp_target", "logp_catalogue", "ndcg10_tiebreak")}
    sizes = per_user.size()
    mean_ndcg = per_user["ndcg10"].mean().to_numpy()
    plain_ndcg = per_user["ndcg10_no_knowledge"].first().to_numpy()
    mean_logp = per_user["logp_catalogue"].mean().to_numpy()
    plain_logp = per_user["logp_catalogue_no_knowledge"].first().to_numpy()
    return {
        "kind": kind, "num_users": int(len(sizes)), "num_rows": int(len(frame)),
        "samples_per_user": {"min": int(sizes.min()), "max": int(sizes.max())},
        "share_best_ne_worst": {"reward": float(np.mean(spread["reward"] > 0)),
                                "ndcg10": float(np.mean(spread["ndcg10"] > 0))},
        "spread_quantiles": {col: {f"q{int(q * 100)}": float(np.quantile(v, q)) for q in QUANTILES}
                             | {"mean": float(v.mean())} for col, v in spread.items()},
        "mean": {"ndcg10": float(frame["ndcg10"].mean()), "reward": float(frame["reward"].mean()),
                 "best_ndcg10": float(per_user["ndcg10"].max().mean()),
                 "worst_ndcg10": float(per_user["ndcg10"].min().mean()),
                 "ndcg10_no_knowledge": float(plain_ndcg.mean()), "logp_catalogue": float(mean_logp.mean()),
                 "logp_catalogue_no_knowledge": float(plain_logp.mean())},
        # Per user: the mean over their samples minus the value without knowledge (paired bootstrap).
        "knowledge_vs_none_on_target": metrics.paired_bootstrap(mean_ndcg, plain_ndcg, num_resamples, seed=seed),
        "knowledge_vs_none_logp": metrics.paired_bootstrap(mean_logp, plain_logp, num_resamples, seed=seed),
        # Users with a usable pair (best - worst >= margin) for each reward kind and margin.
        "usable_users": {k: {f"{m:g}": int(np.sum(spread[col] >= m)) for m in MARGINS[k]} for k, col in columns.items()},
    }
