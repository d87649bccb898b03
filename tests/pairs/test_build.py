"""Preference pairs: the shared schema, the best analysis against those a margin below it, rerank letters and
negatives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from recalign.data.dataset import Dataset
from recalign.pairs.build import (PAIRS_SCHEMA, PairsConfig, WindowsConfig, knowledge_pairs, negative_positions,
                                  rerank_pairs, validate_pairs, window_pairs)
from recalign.prompts import LETTERS, describe_item


def _samples_and_rewards(rows):
    """rows: (user, sample, response, reward)."""
    samples = pa.table({"user_idx": pa.array([r[0] for r in rows], pa.int32()),
                        "sample_idx": pa.array([r[1] for r in rows], pa.int32()),
                        "split": ["train"] * len(rows), "prompt": [f"prompt of user {r[0]}" for r in rows],
                        "response": [r[2] for r in rows]})
    rewards = pa.table({"user_idx": samples["user_idx"], "sample_idx": samples["sample_idx"],
                        "reward": pa.array([r[3] for r in rows], pa.float64())})
    return samples, rewards


ROWS = [
    (0, 0, "a0", 0.5), (0, 1, "a1", 0.9), (0, 2, "a2", 0.1), (0, 3, "a3", 0.3),
    (1, 0, "b0", 0.5), (1, 1, "b1", 0.5005), (1, 2, "b2", 0.5), (1, 3, "b3", 0.5001),  # spread 5e-4 < margin
    (2, 0, "same", 0.8), (2, 1, "same", 0.0), (2, 2, "c2", 0.2), (2, 3, "c3", 0.4),  # worst text == chosen text
    (3, 0, "d0", 0.7), (3, 1, "d1", 0.2),  # only 2 samples: one rejected
    (4, 0, "e0", 0.9), (4, 1, "e1", 0.8995), (4, 2, "e2", 0.5), (4, 3, "e3", 0.4),  # e1 is as good as the best
    (5, 0, "f0", 0.6), (5, 1, "f0", 0.1),  # the only other sample repeats the chosen text
]


def test_knowledge_pairs_reject_only_analyses_a_margin_below_the_best():
    samples, rewards = _samples_and_rewards(ROWS)
    table, counts = knowledge_pairs(samples, rewards, PairsConfig(num_negatives=2, margin=1e-3))
    assert table.schema == PAIRS_SCHEMA
    validate_pairs(table, margin=1e-3)
    rows = {r["user_idx"]: r for r in table.to_pylist()}
    assert sorted(rows) == [0, 2, 3, 4]
    assert rows[0] == {"user_idx": 0, "path": "knowledge", "prompt": "prompt of user 0", "chosen": "a1",
                       "rejected": ["a2", "a3"], "chosen_reward": 0.9, "rejected_rewards": [0.1, 0.3]}
    # user 2: the worst sample repeats the chosen text, so the negatives are the next-worst distinct texts.
    assert rows[2]["chosen"] == "same" and rows[2]["rejected"] == ["c2", "c3"]
    assert rows[3]["rejected"] == ["d1"], "up to K: a row may hold fewer"
    # user 4: e1 lies within the margin of the best, so it is never a rejected, even with room for three
    assert rows[4]["rejected"] == ["e3", "e2"]
    wide, _ = knowledge_pairs(samples, rewards, PairsConfig(num_negatives=3, margin=1e-3))
    assert {r["user_idx"]: r["rejected"] for r in wide.to_pylist()}[4] == ["e3", "e2"]
    assert counts == {"users": 6, "kept": 4, "dropped_margin": 1, "dropped_duplicate_text": 1,
                      "rows_with_fewer_than_k": 1, "rejected": 7}


def test_knowledge_pairs_k1_and_margin_zero_keeps_near_ties():
    samples, rewards = _samples_and_rewards(ROWS)
    table, counts = knowledge_pairs(samples, rewards, PairsConfig(num_negatives=1, margin=0.0))
    rows = {r["user_idx"]: r for r in table.to_pylist()}
    assert rows[0]["rejected"] == ["a2"] and rows[1]["chosen"] == "b1" and rows[1]["rejected"] == ["b0"]
    assert rows[3]["chosen"] == "d0" and rows[3]["rejected"] == ["d1"]
    assert counts["kept"] == 5 and counts["dropped_margin"] == 0
    assert all(r["chosen"] not in r["rejected"] for r in rows.values())


def test_knowledge_pairs_refuse_other_splits_and_unknown_samples():
    samples, rewards = _samples_and_rewards(ROWS)
    test_split = samples.set_column(2, "split", pa.array(["test"] * samples.num_rows))
    with pytest.raises(ValueError, match="'train' prompts only"):
        knowledge_pairs(test_split, rewards, PairsConfig())
    with pytest.raises(ValueError, match="no such sample"):
        knowledge_pairs(samples.slice(1), rewards, PairsConfig())


def test_negative_positions_hard_and_random():
    scores = np.array([[0.9, 0.1, 0.8, 0.3, 0.5], [0.0, 0.2, 0.1, 0.9, 0.4]])
    target = np.array([0, 1])
    hard = negative_positions(target, scores, 3, seed=0, user_idx=np.array([7, 8]), num_candidates=5)
    assert hard.tolist() == [[2, 4, 3], [3, 4, 2]]  # highest-scored non-targets, hardest first
    rand = negative_positions(target, None, 3, seed=0, user_idx=np.array([7, 8]), num_candidates=5)
    assert all(t not in row and len(set(row)) == 3 for t, row in zip(target, rand.tolist()))
    # seeded per user: the same user gets the same negatives wherever its row is
    again = negative_positions(target[::-1], None, 3, seed=0, user_idx=np.array([8, 7]), num_candidates=5)
    assert again.tolist()[::-1] == rand.tolist()


@pytest.fixture(scope="module")
def tiny_data(tiny_data_dir):
    return Dataset(tiny_data_dir)


def test_rerank_pairs_letters_and_hard_negatives(tiny_data, tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    split = tiny_data.split("train")
    scores = np.random.default_rng(0).normal(size=split.candidates.shape)
    scores[np.arange(len(split)), split.target_index] = 99.0  # SASRec loves the target: never a negative
    table, counts = rerank_pairs(tiny_data, tokenizer, PairsConfig(num_negatives=3, negatives="hard"), scores)
    assert table.schema == PAIRS_SCHEMA and counts["kept"] == len(split) == table.num_rows
    validate_pairs(table)
    for i, row in enumerate(table.to_pylist()):
        assert row["user_idx"] == split.user_idx[i] and row["path"] == "rerank"
        assert row["prompt"].endswith("<|im_start|>assistant\n") and "labelled A to T" in row["prompt"]
        target = int(split.target_index[i])
        assert row["chosen"] == LETTERS[target], "the completion is the letter alone: what the re-ranker scores"
        others = [c for c in range(20) if c != target]
        expected = sorted(others, key=lambda c: -scores[i, c])[:3]
        assert row["rejected"] == [LETTERS[c] for c in expected]
        assert row["chosen_reward"] is None and row["rejected_rewards"] is None


def test_rerank_pairs_random_negatives_and_bad_k(tiny_data, tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    table, _ = rerank_pairs(tiny_data, tokenizer, PairsConfig(num_negatives=5, negatives="random", seed=1))
    validate_pairs(table)
    assert all(len(set(r)) == 5 for r in table["rejected"].to_pylist())
    with pytest.raises(ValueError, match="non-target candidates"):
        rerank_pairs(tiny_data, tokenizer, PairsConfig(num_negatives=20, negatives="random"))
    with pytest.raises(ValueError, match="hard negatives need SASRec scores"):
        rerank_pairs(tiny_data, tokenizer, PairsConfig(negatives="hard"))


def test_validate_pairs_rejects_chosen_among_rejected():
    bad = pa.table({"user_idx": pa.array([0], pa.int32()), "path": ["knowledge"], "prompt": ["p"], "chosen": ["x"],
                    "rejected": [["x", "y"]], "chosen_reward": pa.array([1.0]),
                    "rejected_rewards": pa.array([[0.0, 0.0]])}, schema=PAIRS_SCHEMA)
    with pytest.raises(ValueError, match="chosen text is also rejected"):
        validate_pairs(bad)


def test_validate_pairs_checks_the_margin_and_that_a_row_has_a_rejected():
    row = {"user_idx": pa.array([0], pa.int32()), "path": ["knowledge"], "prompt": ["p"], "chosen": ["x"],
           "chosen_reward": pa.array([1.0])}
    close = pa.table({**row, "rejected": [["y"]], "rejected_rewards": pa.array([[0.9995]])}, schema=PAIRS_SCHEMA)
    validate_pairs(close)
    with pytest.raises(ValueError, match="within 0.001 of the chosen"):
        validate_pairs(close, margin=1e-3)
    empty = pa.table({**row, "rejected": [[]], "rejected_rewards": pa.array([[]], pa.list_(pa.float64()))},
                     schema=PAIRS_SCHEMA)
    with pytest.raises(ValueError, match="no rejected completion"):
        validate_pairs(empty)


def _options(prompt: str) -> dict[str, str]:
    """The lettered candidate lines of a re-rank prompt: {letter: description}."""
    return {line[0]: line[3:] for line in prompt.splitlines() if len(line) > 3 and line[0] in LETTERS
            and line[1:3] == ". "}


def test_window_pairs_every_prefix_fresh_negatives_shuffled_letters(tiny_data, tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = PairsConfig(windows=WindowsConfig(per_user=-1, min_history=2, seed=3))
    table, counts = window_pairs(tiny_data, tokenizer, cfg)
    validate_pairs(table)
    users = {u["user_idx"]: u["train_items"] for u in tiny_data.tables["users"].to_pylist()}
    assert counts["kept"] == table.num_rows == sum(len(seq) - 2 for seq in users.values())
    titles = {describe_item(tiny_data.items, i, False): i for i in range(1, tiny_data.num_items + 1)}
    seen_targets: dict[int, list[int]] = {}
    letters = []
    for row in table.to_pylist():
        options = _options(row["prompt"])
        assert len(options) == 20 and sorted(row["rejected"] + [row["chosen"]]) == sorted(options)
        candidates = [titles[options[letter]] for letter in LETTERS[:20]]
        target = candidates[LETTERS.index(row["chosen"])]
        seq = users[row["user_idx"]]
        # every other candidate is an item this user never watched in the train sequence
        assert target in seq and not set(candidates) - {target} & set(seq)
        seen_targets.setdefault(row["user_idx"], []).append(seq.index(target))
        letters.append(row["chosen"])
    # the most recent prefix first, down to min_history items of history; the last is the train example's target
    for user, positions in seen_targets.items():
        assert positions == list(range(len(users[user]) - 1, 1, -1))
    assert len(set(letters)) > 8, "the target's letter moves from window to window"
    again, _ = window_pairs(tiny_data, tokenizer, cfg)
    assert again.equals(table)


def test_window_pairs_per_user_and_subset(tiny_data, tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    two, _ = window_pairs(tiny_data, tokenizer, PairsConfig(windows=WindowsConfig(per_user=2)))
    assert two.num_rows == 2 * tiny_data.num_users
    assert np.bincount(two["user_idx"].to_numpy()).max() == 2
    sub, counts = window_pairs(tiny_data, tokenizer, PairsConfig(windows=WindowsConfig(per_user=-1, max_examples=7)))
    assert sub.num_rows == counts["kept"] == 7
    with pytest.raises(ValueError, match="per_user is 0"):
        window_pairs(tiny_data, tokenizer, PairsConfig())
    with pytest.raises(ValueError, match="per_user must be"):
        WindowsConfig(per_user=-2)
