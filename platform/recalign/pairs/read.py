"""Preference pairs: read and check `pairs/<path>.parquet`, or build heuristic ones from the data.

Schema (`recalign.pairs.PAIRS_SCHEMA`): user_idx int32, path string, prompt string (chat-rendered, ends with the
assistant header), chosen string (no EOS), rejected list<string> (K completions, most-rejected
first), chosen_reward float64 (nullable), rejected_rewards list<float64> (nullable).

`heuristic_pairs` writes files of that schema without the reward stage, for tests, the benchmark
and smoke runs: rerank pairs are the S-DPO construction (chosen = the answer naming the user's true
next item, rejected = answers naming other candidates); knowledge pairs contrast a preference
summary built from the user's most-watched genres and era with ones built from genres the user
rarely watches. They are training signal of a kind, not the recommender-feedback pairs of RLRF4Rec.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recalign import io
from recalign.pairs.build import PAIRS_SCHEMA, PATHS

REQUIRED = ("user_idx", "path", "prompt", "chosen", "rejected")


@dataclass
class PreferenceExample:
    user_idx: int
    path: str
    prompt: str
    chosen: str
    rejected: list[str]  # the first num_negatives of the file's list (most-rejected first)


def load_pairs(uris: list[str], num_negatives: int, max_examples: int = 0, seed: int = 0) -> list[PreferenceExample]:
    """Every row of the pairs files, keeping each row's first `num_negatives` rejected completions.

    max_examples > 0 keeps a seeded random subset of that many rows (in file order), after every
    row was checked, so the subset of a larger file never hides a bad row.

    A row with fewer rejected completions, an empty prompt or a null field is an error naming the
    file, the row and the user, never silently dropped: K must hold for every example.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    examples = []
    for uri in uris:
        table = io.read_parquet(uri)
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise ValueError(f"{uri}: missing column(s) {missing}; pairs need {list(REQUIRED)}")
        rows = table.select(list(REQUIRED)).to_pylist()
        for i, row in enumerate(rows):
            where = f"{uri}: row {i} (user_idx {row['user_idx']})"
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise ValueError(f"{where}: prompt is empty or null")
            if not isinstance(row["chosen"], str):
                raise ValueError(f"{where}: chosen is null")
            rejected = row["rejected"] or []
            if len(rejected) < num_negatives:
                raise ValueError(f"{where}: {len(rejected)} rejected completion(s), num_negatives={num_negatives} "
                                 "needs at least that many; lower num_negatives or rebuild the pairs")
            if any(not isinstance(r, str) for r in rejected[:num_negatives]):
                raise ValueError(f"{where}: a rejected completion is null")
            examples.append(PreferenceExample(int(row["user_idx"]), str(row["path"]), row["prompt"], row["chosen"],
                                              list(rejected[:num_negatives])))
        if not rows:
            raise ValueError(f"{uri}: no pairs")
    if 0 < max_examples < len(examples):
        keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=max_examples, replace=False))
        examples = [examples[i] for i in keep]
    return examples


def heuristic_pairs(data_dir: str, tokenizer, path: str, num_negatives: int, num_users: int = 0, seed: int = 0,
                    prompt_cfg=None) -> pa.Table:
    """Pairs of PAIRS_SCHEMA from the `train` split (no valid/test targets), one row per user.

    num_users: 0 = every user whose train example has its target among the candidates.
    """
    from recalign.data.dataset import Dataset
    from recalign.prompts import PromptConfig

    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    data = Dataset(data_dir)
    split = data.split("train")
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(split.target_index >= 0)
    if num_users:
        rows = np.sort(rng.choice(rows, size=min(num_users, len(rows)), replace=False))
    build = _rerank_row if path == "rerank" else _knowledge_row
    records = [build(data.items, split, r, tokenizer, num_negatives, rng, prompt_cfg or PromptConfig()) for r in rows]
    return pa.Table.from_pylist(records, schema=PAIRS_SCHEMA)


def _rerank_row(items, split, row: int, tokenizer, num_negatives: int, rng, prompt_cfg) -> dict:
    from recalign.prompts import render, rerank_answer, rerank_messages

    candidates = split.candidates[row]
    target = int(split.target_index[row])
    others = [p for p in range(len(candidates)) if p != target]
    if len(others) < num_negatives:
        raise ValueError(f"{len(candidates)} candidates cannot give {num_negatives} negatives")
    negatives = rng.choice(others, size=num_negatives, replace=False)
    prompt = render(tokenizer, rerank_messages(items, split.history[row], split.history_ratings[row], candidates,
                                               prompt_cfg))
    return {"user_idx": int(split.user_idx[row]), "path": "rerank", "prompt": prompt,
            "chosen": rerank_answer(items, candidates, target),
            "rejected": [rerank_answer(items, candidates, int(p)) for p in negatives],
            "chosen_reward": 1.0, "rejected_rewards": [0.0] * num_negatives}


def _knowledge_row(items, split, row: int, tokenizer, num_negatives: int, rng, prompt_cfg) -> dict:
    from recalign.prompts import knowledge_messages, render

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
