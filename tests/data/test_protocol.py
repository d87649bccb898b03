"""The leave-one-out protocol: targets, histories, candidates and no leakage of test items."""

import numpy as np

from recalign.data import loaders
from recalign.data.dataset import Dataset
from recalign.data.protocol import SPLITS, ProtocolConfig, build_tables, example_position, retrieval_candidates
from tests.helpers.data import table_source, toy_tables


def test_protocol_leave_one_out_and_candidates(tmp_path):
    inter, items = toy_tables(num_users=6, per_user=9)
    raw = loaders.load_table(*table_source(tmp_path, inter, items))
    cfg = ProtocolConfig(history_len=4, num_candidates=10, min_interactions=5, seed=3, knowledge_horizon=2)
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
        # the cut-off: 2 items (knowledge_horizon) before the train target, the H items before it as history
        assert rows.loc["cutoff", "target"] == seq[-5] and list(rows.loc["cutoff", "history"]) == seq[-9:-5]
        n = len(seq)
        assert {s: rows.loc[s, "position"] for s in SPLITS} == {"train": n - 3, "valid": n - 2, "test": n - 1,
                                                               "cutoff": n - 5}
        for split in SPLITS:
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
    inter, items = toy_tables(num_users=3, per_user=8)
    inter = inter[~((inter["user_id"] == "u1") & (inter["timestamp"] > 1030))]  # u1 keeps 4
    raw = loaders.load_table(*table_source(tmp_path, inter, items))
    tables, stats = build_tables(raw, ProtocolConfig(min_interactions=5, num_candidates=5))
    assert stats["dropped_users"] == 1 and stats["num_users"] == 2
    assert "u1" not in set(tables["users"]["user_id"].to_pylist())


def test_retrieval_candidates_mode():
    scores = np.array([[0.0, 0.9, 0.8, 0.7, 0.1, 0.5], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    cands, target_index = retrieval_candidates(scores, [np.array([1]), np.array([])], np.array([4, 4]), 3)
    assert cands.tolist() == [[2, 3, 5], [5, 4, 3]]  # history item 1 excluded, padding never a candidate
    assert target_index.tolist() == [-1, 1]


def test_the_cut_off_keeps_a_history_for_short_users():
    assert example_position(20, "cutoff", 5) == 12 and example_position(20, "train", 5) == 17
    assert example_position(6, "cutoff", 5) == 1, "at least one history item before the cut-off"
    assert [example_position(6, s, 1) for s in ("train", "valid", "test", "cutoff")] == [3, 4, 5, 2]
