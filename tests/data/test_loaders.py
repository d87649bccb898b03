"""Loaders, their errors, the canonical dataset and the leave-one-out protocol."""

import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from recalign import io
from recalign.data import loaders
from recalign.data.dataset import DataConfig, Dataset, prepare
from recalign.data.loaders import DataError
from recalign.data.protocol import ProtocolConfig, build_tables, retrieval_candidates


def _table_source(tmp_path, inter: pd.DataFrame, items: pd.DataFrame, fmt: str = "csv"):
    inter_path, items_path = tmp_path / f"inter.{fmt}", tmp_path / f"items.{fmt}"
    for frame, path in ((inter, inter_path), (items, items_path)):
        frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path, index=False)
    return inter_path, items_path


def _toy(num_users=4, per_user=8, num_items=40):
    rows = []
    for u in range(num_users):
        for k in range(per_user):
            rows.append({"user_id": f"u{u}", "item_id": f"i{(u * 7 + k * 3) % num_items}", "timestamp": 1000 + k * 10,
                         "rating": float(1 + k % 5)})
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(num_items)], "title": [f"Movie {i}" for i in range(num_items)],
                          "year": [1990 + i % 10 for i in range(num_items)], "genres": ["Drama|Comedy"] * num_items})
    return pd.DataFrame(rows), items


def test_ml100k_from_recbole():
    raw = loaders.load_ml100k()
    assert len(raw.interactions) == 100_000
    assert raw.interactions["user_id"].nunique() == 943
    assert len(raw.items) == 1682
    toy_story = raw.items[raw.items["item_id"] == "1"].iloc[0]
    assert toy_story["title"] == "Toy Story" and toy_story["year"] == 1995
    assert list(toy_story["genres"]) == ["Animation", "Children's", "Comedy"]


def test_movielens_dat(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n")
    (tmp_path / "movies.dat").write_text("10::GoldenEye (1995)::Action|Adventure|Thriller\n20::Heat (1995)::Crime\n",
                                         encoding="latin-1")
    raw = loaders.load_movielens_dat(tmp_path)
    assert raw.interactions["timestamp"].tolist() == [978300760, 978302109, 978301968]
    assert raw.items.set_index("item_id").loc["10", "title"] == "GoldenEye"
    assert raw.items.set_index("item_id").loc["10", "year"] == 1995
    assert list(raw.items.set_index("item_id").loc["10", "genres"]) == ["Action", "Adventure", "Thriller"]


def test_movielens_dat_bad_row(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::20::3\n")
    (tmp_path / "movies.dat").write_text("10::A (1995)::Drama\n20::B (1996)::Crime\n")
    with pytest.raises(DataError, match=r"ratings\.dat: row 2: expected 4"):
        loaders.load_movielens_dat(tmp_path)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_generic_table(tmp_path, fmt):
    inter, items = _toy()
    inter_path, items_path = _table_source(tmp_path, inter, items, fmt)
    raw = loaders.load_table(inter_path, items_path)
    assert len(raw.interactions) == len(inter)
    assert list(raw.items["genres"].iloc[0]) == ["Drama", "Comedy"]


def test_generic_table_without_rating(tmp_path):
    inter, items = _toy()
    inter_path, items_path = _table_source(tmp_path, inter.drop(columns="rating"), items)
    raw = loaders.load_table(inter_path, items_path)
    assert raw.interactions["rating"].isna().all()


@pytest.mark.parametrize("mutate, pattern", [
    (lambda i, it: (i.drop(columns="timestamp"), it), r"inter\.csv: missing column\(s\) timestamp"),
    (lambda i, it: (i, it.drop(columns="title")), r"items\.csv: missing column\(s\) title"),
    (lambda i, it: (i.assign(item_id=i["item_id"].where(i.index != 5, "nope")), it),
     r"inter\.csv: column item_id, row 6: item id 'nope' is not in .*items\.csv"),
    (lambda i, it: (i.assign(timestamp=i["timestamp"].where(i.index != 2, None)), it),
     r"inter\.csv: column timestamp, row 3: missing value"),
    (lambda i, it: (i.assign(timestamp=i["timestamp"].astype(str).where(i.index != 4, "yesterday")), it),
     r"inter\.csv: column timestamp, row 5: not a number: 'yesterday'"),
    (lambda i, it: (i, pd.concat([it, it.iloc[[3]]], ignore_index=True)),
     r"items\.csv: column item_id, row 41: duplicate item id 'i3'"),
    (lambda i, it: (i.iloc[:0], it), r"inter\.csv: file has no data rows"),
])
def test_bad_input_names_file_column_row(tmp_path, mutate, pattern):
    inter, items = mutate(*_toy())
    inter_path, items_path = _table_source(tmp_path, inter, items)
    with pytest.raises(DataError, match=pattern):
        loaders.load_table(inter_path, items_path)


def test_empty_file(tmp_path):
    inter, items = _toy()
    inter_path, items_path = _table_source(tmp_path, inter, items)
    inter_path.write_text("")
    with pytest.raises(DataError, match=r"inter\.csv: file is empty"):
        loaders.load_table(inter_path, items_path)


def test_protocol_leave_one_out_and_candidates(tmp_path):
    inter, items = _toy(num_users=6, per_user=9)
    raw = loaders.load_table(*_table_source(tmp_path, inter, items))
    cfg = ProtocolConfig(history_len=4, num_candidates=10, min_interactions=5, seed=3)
    tables, stats = build_tables(raw, cfg)
    ex = tables["examples"].to_pandas()
    inter_t = tables["interactions"].to_pandas()
    users = tables["users"].to_pandas()
    assert stats["num_users"] == 6 and stats["dropped_users"] == 0
    for uidx, group in inter_t.groupby("user_idx"):
        seq = group["item_idx"].tolist()  # already chronological
        rows = ex[ex["user_idx"] == uidx].set_index("split")
        assert rows.loc["test", "target"] == seq[-1]
        assert rows.loc["valid", "target"] == seq[-2]
        assert rows.loc["train", "target"] == seq[-3]
        assert list(rows.loc["test", "history"]) == seq[-5:-1]
        assert list(rows.loc["train", "history"]) == seq[-7:-3]
        assert list(users.set_index("user_idx").loc[uidx, "train_items"]) == seq[:-2]
        for split in ("train", "valid", "test"):
            cands = list(rows.loc[split, "candidates"])
            assert len(cands) == 10 and len(set(cands)) == 10
            assert cands[rows.loc[split, "target_index"]] == rows.loc[split, "target"]
            negatives = set(cands) - {rows.loc[split, "target"]}
            assert not negatives & set(seq), "negatives must be items the user never interacted with"
    # Same seed -> same candidates; another seed -> different ones.
    again, _ = build_tables(raw, cfg)
    assert again["examples"].equals(tables["examples"])
    other, _ = build_tables(raw, ProtocolConfig(history_len=4, num_candidates=10, min_interactions=5, seed=4))
    assert other["examples"]["candidates"].to_pylist() != tables["examples"]["candidates"].to_pylist()


def test_no_leakage_of_test_items(ml100k_dir):
    data = Dataset(ml100k_dir)
    test, valid, train = data.split("test"), data.split("valid"), data.split("train")
    sequences = data.train_sequences()
    assert np.array_equal(test.user_idx, valid.user_idx) and np.array_equal(test.user_idx, train.user_idx)
    for row, uidx in enumerate(test.user_idx):
        test_item = test.target[row]
        assert test_item not in sequences[uidx], "test item in the train sequence"
        assert test_item not in valid.history[row], "test item in the validation input"
        assert test_item not in train.history[row] and test_item != train.target[row]
        assert valid.target[row] not in sequences[uidx]
    # Popularity is counted on train sequences only.
    pop = data.item_popularity()
    assert pop.sum() == sum(len(s) for s in sequences)


def test_min_interactions_drops_users(tmp_path):
    inter, items = _toy(num_users=3, per_user=8)
    inter = inter[~((inter["user_id"] == "u1") & (inter["timestamp"] > 1030))]  # u1 keeps 4
    raw = loaders.load_table(*_table_source(tmp_path, inter, items))
    tables, stats = build_tables(raw, ProtocolConfig(min_interactions=5, num_candidates=5))
    assert stats["dropped_users"] == 1 and stats["num_users"] == 2
    assert "u1" not in set(tables["users"]["user_id"].to_pylist())


def test_retrieval_candidates_mode():
    scores = np.array([[0.0, 0.9, 0.8, 0.7, 0.1, 0.5], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    cands, target_index = retrieval_candidates(scores, [np.array([1]), np.array([])], np.array([4, 4]), 3)
    assert cands.tolist() == [[2, 3, 5], [5, 4, 3]]  # history item 1 excluded, padding never a candidate
    assert target_index.tolist() == [-1, 1]


def test_prepare_writes_atomically_and_skips(tmp_path, monkeypatch):
    inter, items = _toy(num_users=5)
    inter_path, items_path = _table_source(tmp_path, inter, items)
    cfg = DataConfig(source="table", interactions=str(inter_path), items=str(items_path),
                     protocol=ProtocolConfig(num_candidates=5))
    data_dir = str(tmp_path / "run" / "data")
    calls = {"n": 0}
    real = io.write_parquet

    def failing(table, uri):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real(table, uri)

    monkeypatch.setattr(io, "write_parquet", failing)
    with pytest.raises(OSError):
        prepare(cfg, data_dir)
    assert not os.path.exists(os.path.join(data_dir, "meta.json")), "a failed prepare must not look complete"
    assert not [f for f in os.listdir(data_dir) if f.startswith(".tmp")], "no temp files left behind"
    monkeypatch.setattr(io, "write_parquet", real)
    meta = prepare(cfg, data_dir)
    assert meta["num_users"] == 5
    stamp = os.path.getmtime(os.path.join(data_dir, "examples.parquet"))
    assert prepare(cfg, data_dir)["fingerprint"] == meta["fingerprint"]
    assert os.path.getmtime(os.path.join(data_dir, "examples.parquet")) == stamp, "unchanged config must skip"
    assert pq.read_table(os.path.join(data_dir, "items.parquet")).num_rows == 40
    split = Dataset(data_dir).split("test")
    assert split.history.shape == (5, 20) and (split.history[:, 0] == 0).all()  # left padded
