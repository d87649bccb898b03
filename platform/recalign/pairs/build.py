"""Preference data for alignment, one schema for both paths (pairs/<path>.parquet).

- knowledge (RLRF4Rec / DPO4Rec): prompt = the sampling prompt; chosen = the best-rewarded analysis,
  rejected = up to K of the others, worst first, each at least `margin` below the chosen (a sample
  within the margin of the best is no worse than it, so it is never a rejected). A user with no
  sample that far below the best is dropped (and counted): a tie carries no preference. Rows may so
  hold fewer than K rejected; the trainer batches them with the missing ones masked out of the loss.
- rerank (DMPO / S-DPO): prompt = history + lettered candidates of the user's `train` example;
  chosen = the target's letter; rejected = K other candidates' letters, random or hard (the ones
  SASRec scores highest, hardest first). The completions are the letters alone, because the
  re-ranker scores a candidate by its letter's logit at the answer position: training on
  "C. Title (1995)" would let the losses move P(title | letter) without moving a letter logit.
  Rewards are unknown there (null).

Only `train` examples are used, so a validation or test item never becomes a pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from recalign.config import option
from recalign.data.dataset import Dataset
from recalign.data.loaders import DataError
from recalign.prompts import PromptConfig, render, rerank_answer, rerank_messages

PATHS = ("knowledge", "rerank")
PAIRS_SPLIT = "train"

PAIRS_SCHEMA = pa.schema([
    ("user_idx", pa.int32()), ("path", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
    ("rejected", pa.list_(pa.string())), ("chosen_reward", pa.float64()),
    ("rejected_rewards", pa.list_(pa.float64())),
])


@dataclass
class PairsConfig:
    paths: list[str] = option(factory=lambda: list(PATHS), help="which pair sets to build")
    num_negatives: int = option(3, "K: at most this many rejected completions per prompt; 1 gives plain DPO pairs")
    margin: float = option(0.01, "knowledge path: every rejected analysis lies at least this far below the chosen "
                                 "one, in the reward's unit (rewards.kind: nats for logp)")
    negatives: Literal["random", "hard"] = option("hard", "rerank path: random candidates or SASRec's top-scored ones")
    seed: int = option(0, "random negatives")
    model: str = option("smollm2", "policy model (name or HF folder) whose chat template renders rerank prompts")
    models_dir: str = option("models", "where named models are converted (recalign.llm.resolve_model)")
    prompt: PromptConfig = option(factory=lambda: PromptConfig(max_history=10, show_genres=False),
                                  help="the re-rank prompt (history shown, ratings, genres): the re-rank policies "
                                       "train on it; evaluation, the sweep and Serve read it from the run")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.paths) - set(PATHS))
        if unknown:
            raise ValueError(f"paths: unknown {unknown}; use {list(PATHS)}")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")


def knowledge_pairs(samples: pa.Table, rewards: pa.Table, cfg: PairsConfig) -> tuple[pa.Table, dict]:
    """Pairs from sampled analyses and their rewards. Returns (pairs table, counts)."""
    frame = rewards.to_pandas()[["user_idx", "sample_idx", "reward"]].merge(
        samples.select(["user_idx", "sample_idx", "split", "prompt", "response"]).to_pandas(),
        on=["user_idx", "sample_idx"], how="left", validate="one_to_one")
    missing = frame["response"].isna()
    if missing.any():
        row = frame[missing].iloc[0]
        raise DataError(f"rewards row user_idx={row.user_idx} sample_idx={row.sample_idx}: no such sample")
    if (frame["split"] != PAIRS_SPLIT).any():
        raise DataError(f"samples: knowledge pairs use {PAIRS_SPLIT!r} prompts only, found "
                         f"{sorted(set(frame['split']) - {PAIRS_SPLIT})}")
    k = cfg.num_negatives
    rows: list[tuple] = []
    counts = {"users": 0, "kept": 0, "dropped_margin": 0, "dropped_duplicate_text": 0, "rows_with_fewer_than_k": 0,
              "rejected": 0}
    for user, group in frame.groupby("user_idx", sort=True):
        counts["users"] += 1
        ordered = group.sort_values(["reward", "sample_idx"], ascending=[False, True], kind="stable")
        best = ordered.iloc[0]
        # Lowest rewards first; a text identical to the chosen one (or to a worse one) cannot be a distinct negative.
        pool = ordered.iloc[1:].sort_values(["reward", "sample_idx"], kind="stable")
        distinct = pool[pool["response"] != best["response"]].drop_duplicates("response")
        below = distinct[distinct["reward"] <= best["reward"] - cfg.margin]
        if below.empty:
            counts["dropped_duplicate_text" if distinct.empty and len(pool) else "dropped_margin"] += 1
            continue
        worst = below.iloc[:k]  # up to K, worst first, every one at least `margin` below the chosen
        counts["rows_with_fewer_than_k"] += int(len(worst) < k)
        counts["rejected"] += len(worst)
        rows.append((int(user), "knowledge", best["prompt"], best["response"], list(worst["response"]),
                     float(best["reward"]), [float(r) for r in worst["reward"]]))
        counts["kept"] += 1
    return _table(rows), counts


def rerank_pairs(data: Dataset, tokenizer, cfg: PairsConfig, sasrec_scores: np.ndarray | None = None,
                 rows: np.ndarray | None = None) -> tuple[pa.Table, dict]:
    """Pairs from every user's `train` example (or those `rows` of the split). `sasrec_scores` (B, C) over
    the candidates of those rows, needed for hard negatives."""
    split = data.split(PAIRS_SPLIT)
    if rows is not None:
        split = split.subset(np.asarray(rows))
    num_candidates = split.candidates.shape[1]
    if cfg.num_negatives > num_candidates - 1:
        raise ValueError(f"num_negatives={cfg.num_negatives} but only {num_candidates - 1} non-target candidates")
    if cfg.negatives == "hard" and (sasrec_scores is None or sasrec_scores.shape != split.candidates.shape):
        raise ValueError(f"hard negatives need SASRec scores of shape {split.candidates.shape}")
    positions = negative_positions(split.target_index, sasrec_scores if cfg.negatives == "hard" else None,
                                   cfg.num_negatives, cfg.seed, split.user_idx, num_candidates)
    items = data.items
    rows = []
    skipped = 0
    for row in range(len(split)):
        target = int(split.target_index[row])
        if target < 0:
            skipped += 1  # retrieval-mode example without its target: no chosen answer
            continue
        candidates = split.candidates[row]
        messages = rerank_messages(items, split.history[row], split.history_ratings[row], candidates, cfg.prompt)
        rows.append((int(split.user_idx[row]), "rerank", render(tokenizer, messages),
                     rerank_answer(target),
                     [rerank_answer(int(p)) for p in positions[row]], None, None))
    return _table(rows), {"users": len(split), "kept": len(rows), "skipped_no_target": skipped,
                          "negatives": cfg.negatives}


def negative_positions(target_index: np.ndarray, scores: np.ndarray | None, k: int, seed: int,
                       user_idx: np.ndarray, num_candidates: int) -> np.ndarray:
    """(B, K) candidate columns to reject, never the target's.

    With scores (B, C): the K highest-scored non-targets, highest first (hard). Without: K drawn
    uniformly per user from a generator seeded by (seed, user), so the draw does not depend on row order.
    """
    out = np.zeros((len(target_index), k), dtype=np.int64)
    for row, target in enumerate(target_index):
        others = np.array([c for c in range(num_candidates) if c != target])
        if scores is not None:
            order = np.argsort(-scores[row, others], kind="stable")
            out[row] = others[order[:k]]
        else:
            out[row] = np.random.default_rng([seed, int(user_idx[row])]).choice(others, size=k, replace=False)
    return out


def _table(rows: list[tuple]) -> pa.Table:
    columns = list(zip(*rows)) if rows else [[] for _ in PAIRS_SCHEMA.names]
    return pa.table({name: pa.array(list(col), type=PAIRS_SCHEMA.field(name).type)
                     for name, col in zip(PAIRS_SCHEMA.names, columns)}, schema=PAIRS_SCHEMA)


def validate_pairs(table: pa.Table, where: str = "pairs", margin: float | None = None) -> None:
    """Raise if a pairs table breaks the shared schema: columns, 1..K rejected per row, chosen never among
    rejected, and (with `margin`) every rejected reward at least `margin` below the chosen one."""
    if table.schema.names != PAIRS_SCHEMA.names:
        raise DataError(f"{where}: columns {table.schema.names}, expected {PAIRS_SCHEMA.names}")
    rows = zip(table["chosen"].to_pylist(), table["rejected"].to_pylist(), table["chosen_reward"].to_pylist(),
               table["rejected_rewards"].to_pylist())
    for i, (chosen, rejected, chosen_reward, rejected_rewards) in enumerate(rows):
        if not rejected:
            raise DataError(f"{where}: row {i}: no rejected completion")
        if chosen in rejected:
            raise DataError(f"{where}: row {i}: chosen text is also rejected")
        if margin is not None and chosen_reward is not None and any(
                chosen_reward - r < margin - 1e-12 for r in rejected_rewards or []):
            raise DataError(f"{where}: row {i}: a rejected reward lies within {margin:g} of the chosen one")
