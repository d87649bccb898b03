"""The evaluation protocol every stage shares: chronological leave-one-out with sampled candidates.

Per user, interactions sorted by time (positions 0 .. n-1):
- `test`   target = the last item (n-1), history = the H items before it;
- `valid`  target = the second to last (n-2), history = the H items before it;
- `train`  target = the third to last (n-3, the last *training* interaction), history = the H items before it;
- `cutoff` target = the item `knowledge_horizon` items before the train target (n-3-horizon, at least 1),
  history = the H items before it. An analysis written from this history may only be used to predict
  the items from the cut-off on: the reward model learns to read analyses on those horizon items, and
  the train target, on which the rewards are scored, stays out of its training.
The train sequence (everything before the validation target) is what models train on. Rewards
and preference pairs use the `train` example only, so a test or validation item never reaches them.
Every example records `position`, its target's index in the user's sequence.

Each example gets C candidates: the target plus C-1 items the user never interacted with, drawn
with a generator seeded by (seed, user, split) so they do not depend on processing order, then
shuffled so the target's position carries no signal (an LLM that always answers "A" gains nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from recalign.config import option
from recalign.data.loaders import DataError, RawData

SPLITS = ("train", "valid", "test", "cutoff")


@dataclass
class ProtocolConfig:
    history_len: int = option(20, "H: items of history fed to every model and prompt")
    num_candidates: int = option(20, "C: the target plus C-1 sampled negatives")
    min_interactions: int = option(5, "users with fewer are dropped (train example needs a history)")
    seed: int = option(0, "seeds candidate sampling")
    knowledge_horizon: int = option(5, "the cutoff example's target lies this many items before the train target: "
                                       "the items an analysis written at the cut-off trains the reward model on")

    def __post_init__(self) -> None:
        if self.history_len < 1 or self.num_candidates < 2 or self.knowledge_horizon < 1:
            raise ValueError("history_len and knowledge_horizon must be >= 1 and num_candidates >= 2")
        if self.min_interactions < 4:
            raise ValueError("min_interactions must be >= 4 (train, valid and test targets plus a history)")


def build_tables(raw: RawData, cfg: ProtocolConfig) -> tuple[dict[str, pa.Table], dict[str, int]]:
    """Canonical tables (items, interactions, users with train sequences, examples of all splits),
    plus counts for the dataset's metadata."""
    items = raw.items.sort_values("item_id", key=_natural_key, kind="stable").reset_index(drop=True)
    items.insert(0, "item_idx", np.arange(1, len(items) + 1, dtype=np.int32))  # 0 is padding
    inter, users, dropped_users = _chronological(raw, dict(zip(items["item_id"], items["item_idx"])), cfg)
    user_rows, example_rows = [], []
    for uidx, group in inter.groupby("user_idx", sort=True):
        user, examples = _user_rows(raw.name, int(uidx), group, len(items), cfg)
        user_rows.append(user)
        example_rows += examples
    tables = {"items": _items_table(items), "interactions": _interactions_table(inter),
              "users": _rows_table(user_rows, USER_COLUMNS), "examples": _rows_table(example_rows, EXAMPLE_COLUMNS)}
    return tables, {"dropped_users": dropped_users, "num_users": len(users), "num_items": len(items),
                    "num_interactions": len(inter)}


def example_position(length: int, split: str, knowledge_horizon: int) -> int:
    """Index of a split's target in a user's chronological sequence of `length` items."""
    if split == "cutoff":
        return max(1, length - 3 - knowledge_horizon)
    return length - 3 + SPLITS.index(split)  # train: n-3, valid: n-2, test: n-1


def _chronological(raw: RawData, item_idx: dict, cfg: ProtocolConfig) -> tuple[pd.DataFrame, pd.Index, int]:
    """Interactions with item and user indices, users with too few dropped, sorted by user then time."""
    inter = raw.interactions.copy()
    inter["item_idx"] = inter["item_id"].map(item_idx).astype(np.int32)
    # Stable sort keeps file order for equal timestamps, so ties resolve the same way every run.
    inter = inter.sort_values(["user_id", "timestamp"], key=_natural_key, kind="stable")
    counts = inter.groupby("user_id", sort=False).size()
    kept = counts[counts >= cfg.min_interactions].index
    inter = inter[inter["user_id"].isin(kept)]
    if inter.empty:
        raise DataError(f"{raw.name}: no user has >= {cfg.min_interactions} interactions")
    users = pd.Index(kept).sort_values(key=_natural_key)
    user_idx = {u: i for i, u in enumerate(users)}
    inter["user_idx"] = inter["user_id"].map(user_idx).astype(np.int32)
    inter = inter.sort_values(["user_idx"], kind="stable").reset_index(drop=True)
    return inter, users, int((counts < cfg.min_interactions).sum())


def _user_rows(name: str, uidx: int, group: pd.DataFrame, num_items: int, cfg: ProtocolConfig) -> tuple[tuple, list]:
    """One user's row of the users table and their example rows (train, valid, test)."""
    seq = group["item_idx"].to_numpy(np.int32)
    ratings = group["rating"].to_numpy(np.float32)
    seen = set(seq.tolist())
    user_id = group["user_id"].iloc[0]
    if num_items - len(seen) < cfg.num_candidates - 1:
        raise DataError(f"{name}: user {user_id!r} has interacted with too many items "
                        f"to draw {cfg.num_candidates - 1} negatives from {num_items}")
    examples = []
    for split_code, split in enumerate(SPLITS):
        pos = example_position(len(seq), split, cfg.knowledge_horizon)
        start = max(0, pos - cfg.history_len)
        rng = np.random.default_rng([cfg.seed, uidx, split_code])
        candidates, target_index = draw_candidates(rng, int(seq[pos]), seen, num_items, cfg.num_candidates)
        examples.append((uidx, user_id, split, seq[start:pos], ratings[start:pos], int(seq[pos]), candidates,
                         target_index, pos))
    return (uidx, user_id, seq[:-2], ratings[:-2], len(seq)), examples


USER_COLUMNS = {"user_idx": pa.int32(), "user_id": pa.string(), "train_items": pa.list_(pa.int32()),
                "train_ratings": pa.list_(pa.float32()), "num_interactions": pa.int32()}
EXAMPLE_COLUMNS = {"user_idx": pa.int32(), "user_id": pa.string(), "split": pa.string(),
                   "history": pa.list_(pa.int32()), "history_ratings": pa.list_(pa.float32()), "target": pa.int32(),
                   "candidates": pa.list_(pa.int32()), "target_index": pa.int32(), "position": pa.int32()}


def _rows_table(rows: list[tuple], columns: dict[str, pa.DataType]) -> pa.Table:
    return pa.table({name: pa.array([r[i] for r in rows], kind, from_pandas=True)
                     for i, (name, kind) in enumerate(columns.items())})


def _interactions_table(inter: pd.DataFrame) -> pa.Table:
    return pa.table({
        "user_idx": pa.array(inter["user_idx"], pa.int32()),
        "user_id": pa.array(inter["user_id"], pa.string()),
        "item_idx": pa.array(inter["item_idx"], pa.int32()),
        "timestamp": pa.array(inter["timestamp"], pa.int64()),
        "rating": pa.array(inter["rating"], pa.float32(), from_pandas=True),
    })


def draw_candidates(rng: np.random.Generator, target: int, seen: set[int], num_items: int,
                    num_candidates: int) -> tuple[np.ndarray, int]:
    """The target and C-1 distinct items outside `seen`, shuffled; returns (candidates, the target's column)."""
    negatives: list[int] = []
    chosen: set[int] = set()
    while len(negatives) < num_candidates - 1:
        for item in rng.integers(1, num_items + 1, size=2 * num_candidates).tolist():
            if item not in seen and item not in chosen:
                chosen.add(item)
                negatives.append(item)
                if len(negatives) == num_candidates - 1:
                    break
    candidates = np.array(negatives + [target], dtype=np.int32)
    rng.shuffle(candidates)
    return candidates, int(np.nonzero(candidates == target)[0][0])


def retrieval_candidates(scores: np.ndarray, histories: list[np.ndarray], targets: np.ndarray,
                         num_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates = a recommender's top C items, history excluded; the target may be absent.

    scores: (B, num_items + 1) over item indices (column 0 is padding). Returns candidates (B, C)
    and target_index (B,), -1 where the target is not among the top C.
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    scores[:, 0] = -np.inf
    for row, history in enumerate(histories):
        scores[row, np.asarray(history, dtype=np.int64)] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :num_candidates].astype(np.int32)
    hit = top == np.asarray(targets)[:, None]
    target_index = np.where(hit.any(axis=1), hit.argmax(axis=1), -1).astype(np.int32)
    return top, target_index


def _items_table(items: pd.DataFrame) -> pa.Table:
    columns = {
        "item_idx": pa.array(items["item_idx"], pa.int32()),
        "item_id": pa.array(items["item_id"], pa.string()),
        "title": pa.array(items["title"], pa.string()),
        "year": pa.array(items["year"], pa.int32(), from_pandas=True),
        "genres": pa.array(items["genres"], pa.list_(pa.string())),
    }
    for extra in items.columns:
        if extra not in columns:
            columns[extra] = pa.array(items[extra].astype("string"), pa.string(), from_pandas=True)
    return pa.table(columns)


def _natural_key(values: pd.Series) -> pd.Series:
    """Sort ids numerically when they all are numbers ("2" < "10"), else as strings."""
    numeric = pd.to_numeric(values, errors="coerce")
    if not pd.api.types.is_numeric_dtype(values) and numeric.notna().all():
        return numeric
    return values
