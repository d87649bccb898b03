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
- rerank SFT set (`window_pairs`, LlamaRec): every user's sliding-window prefixes of the train sequence,
  each target with C-1 fresh negatives the user never watched in it, the letters shuffled per example;
  chosen = the target's letter, rejected = the other C-1 letters, so the listwise SFT loss (a softmax
  over the C letters) sees every candidate.

Only `train` examples and train sequences are used, so a validation or test item never becomes a pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from recalign.config import option
from recalign.data.dataset import Dataset
from recalign.data.loaders import DataError
from recalign.data.protocol import draw_candidates
from recalign.prompts import PromptConfig, render, rerank_answer, rerank_messages

PATHS = ("knowledge", "rerank")
PAIRS_SPLIT = "train"

PAIRS_SCHEMA = pa.schema([
    ("user_idx", pa.int32()), ("path", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
    ("rejected", pa.list_(pa.string())), ("chosen_reward", pa.float64()),
    ("rejected_rewards", pa.list_(pa.float64())),
])


@dataclass
class WindowsConfig:
    """The re-rank SFT set: sliding-window prefixes of the train sequences (LlamaRec), pairs/rerank_sft.parquet."""

    per_user: int = option(0, "windows per user, the most recent first (-1 = every prefix; 0 = no SFT set: the "
                              "SFT policy trains on the train examples of pairs/rerank.parquet)")
    min_history: int = option(3, "a window's target has at least this many train items before it")
    max_examples: int = option(0, "> 0: a seeded random subset of this many windows over all users")
    seed: int = option(0, "negatives and letter order of every window, the subset")

    def __post_init__(self) -> None:
        if self.per_user < -1:
            raise ValueError(f"per_user must be -1 (every prefix), 0 (off) or > 0, got {self.per_user}")
        if self.min_history < 1:
            raise ValueError(f"min_history must be >= 1, got {self.min_history}")
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {self.max_examples}")


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
    windows: WindowsConfig = option(factory=WindowsConfig, help="the re-rank SFT set (sliding windows)")

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


def window_pairs(data: Dataset, tokenizer, cfg: PairsConfig) -> tuple[pa.Table, dict]:
    """The re-rank SFT set: per user, up to `cfg.windows.per_user` prefixes of the train sequence, the most
    recent first (the last is the train example's target). Each prefix predicts its next item among it and
    C-1 items drawn from those the user never watched in the train sequence, shuffled by a generator seeded
    by (seed, user, position); the history is the H items before it, as in the protocol's examples."""
    win = cfg.windows
    if win.per_user == 0:
        raise ValueError("windows.per_user is 0: no SFT set to build")
    num_candidates = data.split(PAIRS_SPLIT).candidates.shape[1]
    users = data.tables["users"].select(["user_idx", "train_items", "train_ratings"]).to_pylist()
    chosen_windows: list[tuple[int, int]] = []  # (user row, target position)
    for u, user in enumerate(users):
        positions = list(range(len(user["train_items"]) - 1, win.min_history - 1, -1))
        chosen_windows += [(u, p) for p in (positions if win.per_user < 0 else positions[:win.per_user])]
    if 0 < win.max_examples < len(chosen_windows):
        keep = np.sort(np.random.default_rng(win.seed).choice(len(chosen_windows), win.max_examples, replace=False))
        chosen_windows = [chosen_windows[i] for i in keep]
    rows = []
    for u, pos in chosen_windows:
        user = users[u]
        seq, ratings = user["train_items"], user["train_ratings"]
        rng = np.random.default_rng([win.seed, int(user["user_idx"]), pos])
        candidates, target = draw_candidates(rng, int(seq[pos]), set(seq), data.num_items, num_candidates)
        start = max(0, pos - data.history_len)
        messages = rerank_messages(data.items, seq[start:pos], ratings[start:pos], candidates, cfg.prompt)
        rows.append((int(user["user_idx"]), "rerank", render(tokenizer, messages), rerank_answer(target),
                     [rerank_answer(c) for c in range(num_candidates) if c != target], None, None))
    if not rows:
        raise DataError(f"windows: no user has a train item after {win.min_history} others; lower "
                        "pairs.windows.min_history")
    return _table(rows), {"users": len(users), "kept": len(rows), "per_user": win.per_user,
                          "candidates": num_candidates}


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
