"""Heuristic preference pairs built from the data alone, in the pairs schema: for tests, the alignment
benchmark and `jobs/train_dpo.py` runs before the reward stage exists.

- rerank: the S-DPO construction over each user's `train` example (`recalign.pairs.build.rerank_pairs`
  with random negatives): chosen = the answer naming the user's true next item, rejected = other candidates.
- knowledge: a preference summary built from the user's most-watched genres and era, against ones built
  from genres the user rarely watches. Training signal of a kind, not the recommender-feedback pairs of
  RLRF4Rec.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from recalign.data.dataset import Dataset
from recalign.pairs.build import PAIRS_SCHEMA, PAIRS_SPLIT, PATHS, PairsConfig, rerank_pairs
from recalign.prompts import PromptConfig, knowledge_messages, render


def heuristic_pairs(data_dir: str, tokenizer, path: str, num_negatives: int, num_users: int = 0, seed: int = 0,
                    prompt_cfg=None) -> pa.Table:
    """Pairs of PAIRS_SCHEMA from the `train` split (no valid/test targets), one row per user.

    num_users: 0 = every user whose train example has its target among the candidates.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    data = Dataset(data_dir)
    split = data.split(PAIRS_SPLIT)
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(split.target_index >= 0)
    if num_users:
        rows = np.sort(rng.choice(rows, size=min(num_users, len(rows)), replace=False))
    cfg = PairsConfig(paths=[path], num_negatives=num_negatives, negatives="random", seed=seed,
                      **({"prompt": prompt_cfg} if prompt_cfg is not None else {}))
    if path == "rerank":
        return rerank_pairs(data, tokenizer, cfg, rows=rows)[0]
    records = [_knowledge_row(data.items, split, r, tokenizer, num_negatives, rng, prompt_cfg or PromptConfig())
               for r in rows]
    return pa.Table.from_pylist(records, schema=PAIRS_SCHEMA)


def _knowledge_row(items, split, row: int, tokenizer, num_negatives: int, rng, prompt_cfg) -> dict:
    history = [int(i) for i in split.history[row] if i != 0]
    genre_counts = Counter(g for i in history for g in (items.loc[i, "genres"] if len(items.loc[i, "genres"]) else []))
    all_genres = sorted({g for gs in items["genres"] for g in gs})
    liked = [g for g, _ in genre_counts.most_common(2)] or all_genres[:2]
    unliked = [g for g in all_genres if g not in liked]
    rare = [g for g in unliked if genre_counts[g] <= 1] or unliked
    years = [int(y) for y in items.loc[history, "year"].dropna()] or [1995]
    decade = int(np.median(years)) // 10 * 10
    prompt = render(tokenizer, knowledge_messages(items, split.history[row], split.history_ratings[row], prompt_cfg))
    rejected = []
    for _ in range(num_negatives):
        picked = list(rng.choice(rare, size=min(2, len(rare)), replace=False))
        rejected.append(_summary(picked, int(rng.choice([d for d in range(1930, 2000, 10) if d != decade])), liked))
    return {"user_idx": int(split.user_idx[row]), "path": "knowledge", "prompt": prompt,
            "chosen": _summary(liked, decade, rare[:2]), "rejected": rejected,
            "chosen_reward": 1.0, "rejected_rewards": [0.0] * num_negatives}


def _summary(likes: list[str], decade: int, dislikes: list[str]) -> str:
    return (f"This user mostly enjoys {' and '.join(likes)} movies, especially from the {decade}s, with "
            f"{'light' if 'Comedy' in likes else 'serious'} moods. They seem less interested in "
            f"{' and '.join(dislikes)}, so the next movie should be a {likes[0].lower()} title.")
