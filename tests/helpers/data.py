"""Small datasets for tests: toy interaction tables, and a tiny prepared run of clustered random users."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recalign.data.dataset import DataConfig
from recalign.data.protocol import ProtocolConfig
from recalign.runs import RunSpec

SENTINEL_TEST = "SENTINEL TEST ITEM"
SENTINEL_VALID = "SENTINEL VALID ITEM"


def toy_tables(num_users: int = 4, per_user: int = 8, num_items: int = 40) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(interactions, items): user u watches items (7u + 3k) mod num_items at times 1000 + 10k."""
    rows = []
    for u in range(num_users):
        for k in range(per_user):
            rows.append({"user_id": f"u{u}", "item_id": f"i{(u * 7 + k * 3) % num_items}", "timestamp": 1000 + k * 10,
                         "rating": float(1 + k % 5)})
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(num_items)],
                          "title": [f"Movie {i}" for i in range(num_items)],
                          "year": [1990 + i % 10 for i in range(num_items)], "genres": ["Drama|Comedy"] * num_items})
    return pd.DataFrame(rows), items


def table_source(folder: Path, inter: pd.DataFrame, items: pd.DataFrame, fmt: str = "csv") -> tuple[Path, Path]:
    """Write the two tables as the `table` source reads them; returns (interactions path, items path)."""
    inter_path, items_path = Path(folder) / f"inter.{fmt}", Path(folder) / f"items.{fmt}"
    for frame, path in ((inter, inter_path), (items, items_path)):
        frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path, index=False)
    return inter_path, items_path


def tiny_data_config(root: str | Path, num_users: int = 24, num_items: int = 40, sentinels: bool = False,
                     seed: int = 0, num_candidates: int = 20) -> DataConfig:
    """Clustered random interactions (user u likes the items i with i % 4 == u % 4) written under `root`.

    With `sentinels`, every user's second-to-last interaction is one shared item titled SENTINEL VALID
    ITEM and the last one SENTINEL TEST ITEM: the protocol makes them every user's valid and test
    targets, and since every user has seen them they are never anyone's negative candidate.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    genres = ["Drama", "Comedy", "Horror", "Sci-Fi"]
    items = [{"item_id": str(i), "title": f"Movie {i}", "year": 1990 + i % 10, "genres": [genres[i % 4]]}
             for i in range(1, num_items + 1)]
    if sentinels:
        items += [{"item_id": "valid", "title": SENTINEL_VALID, "year": 2000, "genres": ["Drama"]},
                  {"item_id": "test", "title": SENTINEL_TEST, "year": 2000, "genres": ["Drama"]}]
    rows = []
    for user in range(num_users):
        liked = [i for i in range(1, num_items + 1) if i % 4 == user % 4]
        length = int(rng.integers(7, 12))
        seq = list(rng.choice(liked, size=min(length, len(liked)), replace=False))
        seq = [str(i) for i in seq] + (["valid", "test"] if sentinels else [])
        rows += [{"user_id": f"u{user}", "item_id": item, "timestamp": t, "rating": float(rng.integers(1, 6))}
                 for t, item in enumerate(seq)]
    pd.DataFrame(rows).to_parquet(root / "interactions.parquet")
    pd.DataFrame(items).to_parquet(root / "items.parquet")
    return DataConfig(source="table", interactions=str(root / "interactions.parquet"),
                      items=str(root / "items.parquet"), name="tiny",
                      protocol=ProtocolConfig(num_candidates=num_candidates))


def tiny_run(root: str | Path, name: str = "tiny", **kw) -> RunSpec:
    """A run under `root/runs/<name>` whose data stage has run on `tiny_data_config(root, **kw)`."""
    from recalign.data.stage import prepare_stage

    run = RunSpec(name=name, root=str(Path(root) / "runs"))
    prepare_stage(run, tiny_data_config(root, **kw), log=lambda _: None)
    return run


def make_tiny_dataset(root: str | Path, **kw) -> str:
    """The data dir of `tiny_run(root, **kw)`."""
    return tiny_run(root, **kw).dir("data")
