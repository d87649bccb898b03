"""Systems scored on a split and compared with paired-bootstrap CIs: the numbers behind every table."""

import numpy as np
import pytest

from recalign.data.dataset import SplitArrays
from recalign.systems import EvalConfig, evaluate, markdown_table, popularity_scores, random_scores, summarise


def _split(target_index):
    n = len(target_index)
    return SplitArrays(user_idx=np.arange(n), history=np.zeros((n, 2), dtype=np.int64),
                       history_ratings=np.full((n, 2), np.nan, dtype=np.float32), target=np.arange(n) + 1,
                       candidates=np.tile(np.arange(1, 4), (n, 1)), target_index=np.asarray(target_index),
                       position=np.zeros(n, dtype=np.int64))


def test_evaluate_by_hand_with_paired_differences_to_the_reference():
    split = _split([0, 1, 2, 0])
    perfect = np.eye(3)[split.target_index]  # the target scores 1, the others 0
    worst = 1.0 - perfect  # every other candidate beats the target
    cfg = EvalConfig(metrics=("hr@1", "mrr"), reference="perfect", num_resamples=200)
    result = evaluate({"perfect": perfect, "worst": worst}, split, cfg, notes={"worst": "a note"})
    assert result["reference"] == "perfect" and result["split"] == "test"
    p, w = result["systems"]["perfect"], result["systems"]["worst"]
    assert p["hr@1"]["mean"] == 1.0 and p["mrr"]["mean"] == 1.0 and p["num_rows"] == 4
    assert w["hr@1"]["mean"] == 0.0 and w["mrr"]["mean"] == pytest.approx(1 / 3), "ties count against the target"
    assert w["mrr"]["vs_reference"]["diff"] == pytest.approx(1 / 3 - 1)
    assert w["mrr"]["vs_reference"]["low"] == w["mrr"]["vs_reference"]["high"], "a constant difference has no spread"
    assert "vs_reference" not in p["mrr"] and w["note"] == "a note"


def test_systems_on_a_subset_are_compared_on_the_rows_they_share():
    cfg = EvalConfig(metrics=("hr@1",), reference="ref", num_resamples=100)
    per_example = {"ref": {"hr@1": np.array([1.0, 0.0, 1.0, 0.0])}, "sub": {"hr@1": np.array([1.0, 1.0])}}
    rows = {"ref": np.arange(4), "sub": np.array([1, 3])}
    result = summarise(per_example, cfg, rows)
    sub = result["systems"]["sub"]
    assert sub["num_rows"] == 2 and sub["hr@1"]["mean"] == 1.0
    assert sub["hr@1"]["vs_reference"]["diff"] == 1.0, "rows 1 and 3: the reference misses both"


def test_markdown_table_has_a_row_per_system_and_the_reference_column():
    split = _split([0, 1])
    cfg = EvalConfig(metrics=("hr@1", "ndcg@10"), reference="a", num_resamples=50)
    result = evaluate({"a": np.eye(3)[[0, 1]], "b": np.eye(3)[[1, 0]]}, split, cfg)
    lines = markdown_table(result).strip().split("\n")
    assert lines[0] == "| system | rows | hr@1 | ndcg@10 | Δndcg@10 vs a (95% CI) |"
    assert lines[2].startswith("| a | 2 | 1.0000 [1.0000, 1.0000]") and lines[2].endswith("| reference |")
    assert lines[3].startswith("| b | 2 | 0.0000") and "-0.5000" in lines[3]  # rank 3 of 3 (ties count against): 1/log2(4) - 1
    assert markdown_table({"systems": {}}) == "(no systems)\n"


def test_random_and_popularity_baselines():
    split = _split([0, 1, 2])
    scores = random_scores(split, seed=3)
    assert scores.shape == (3, 3) and np.array_equal(scores, random_scores(split, seed=3))
    assert not np.array_equal(scores, random_scores(split, seed=4))
    popularity = np.array([0, 5, 1, 9])  # index 0 is padding
    assert popularity_scores(split, popularity).tolist() == [[5, 1, 9]] * 3
