"""Preference pairs as the trainer reads them: `pairs/<path>.parquet` files, checked row by row.

Schema (`recalign.pairs.build.PAIRS_SCHEMA`): user_idx int32, path string, prompt string (chat-rendered,
ends with the assistant header), chosen string (no EOS), rejected list<string> (K completions,
most-rejected first), chosen_reward float64 (nullable), rejected_rewards list<float64> (nullable).
Heuristic pairs for runs without the reward stage are `recalign.pairs.heuristic`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recalign import io
from recalign.data.loaders import DataError

REQUIRED = ("user_idx", "path", "prompt", "chosen", "rejected")


@dataclass
class PreferenceExample:
    user_idx: int
    path: str
    prompt: str
    chosen: str
    rejected: list[str]  # up to num_negatives of the file's list (most-rejected first), at least one


def load_pairs(uris: list[str], num_negatives: int, max_examples: int = 0, seed: int = 0) -> list[PreferenceExample]:
    """Every row of the pairs files, keeping up to each row's first `num_negatives` rejected completions.

    A row may hold fewer (the knowledge path keeps only negatives a margin below the chosen one): the
    trainer pads its batch and masks the missing ones out of the loss. max_examples > 0 keeps a seeded
    random subset of that many rows (in file order), after every row was checked, so the subset of a
    larger file never hides a bad row.

    A row without a rejected completion, an empty prompt or a null field is an error naming the file,
    the row and the user, never silently dropped.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    examples = []
    for uri in uris:
        table = io.read_parquet(uri)
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise DataError(f"{uri}: missing column(s) {missing}; pairs need {list(REQUIRED)}")
        rows = table.select(list(REQUIRED)).to_pylist()
        for i, row in enumerate(rows):
            where = f"{uri}: row {i} (user_idx {row['user_idx']})"
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise DataError(f"{where}: prompt is empty or null")
            if not isinstance(row["chosen"], str):
                raise DataError(f"{where}: chosen is null")
            rejected = row["rejected"] or []
            if not rejected:
                raise DataError(f"{where}: no rejected completion")
            if any(not isinstance(r, str) for r in rejected[:num_negatives]):
                raise DataError(f"{where}: a rejected completion is null")
            examples.append(PreferenceExample(int(row["user_idx"]), str(row["path"]), row["prompt"], row["chosen"],
                                              list(rejected[:num_negatives])))
        if not rows:
            raise DataError(f"{uri}: no pairs")
    if 0 < max_examples < len(examples):
        keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=max_examples, replace=False))
        examples = [examples[i] for i in keep]
    return examples
