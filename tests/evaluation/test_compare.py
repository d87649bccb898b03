"""The comparisons the methods are about: which pairs, paired on shared rows, and their table."""

import numpy as np
import pytest

from recalign.evaluation.compare import compare_systems, comparison_pairs, comparisons_table
from recalign.systems import EvalConfig

NAMES = ["random", "sasrec", "ka-sasrec + base knowledge", "ka-sasrec + dpo knowledge", "ka-sasrec + sdpo knowledge",
         "llm zero-shot", "llm sft", "llm sft+dpo", "llm sft+dmpo", "llm sft+sdpo"]


def test_the_pairs_are_alignment_against_its_start_and_k_negatives_against_dpo():
    assert comparison_pairs(NAMES) == [
        ("ka-sasrec + dpo knowledge", "ka-sasrec + base knowledge"),
        ("ka-sasrec + sdpo knowledge", "ka-sasrec + base knowledge"),
        ("llm sft", "llm zero-shot"), ("llm sft+dpo", "llm sft"), ("llm sft+dpo", "llm zero-shot"),
        ("llm sft+dmpo", "llm sft"), ("llm sft+dmpo", "llm zero-shot"), ("llm sft+sdpo", "llm sft"),
        ("llm sft+sdpo", "llm zero-shot"), ("llm sft+dmpo", "llm sft+dpo"), ("llm sft+sdpo", "llm sft+dpo"),
        ("ka-sasrec + sdpo knowledge", "ka-sasrec + dpo knowledge")]
    assert comparison_pairs(["sasrec", "llm sft+sdpo"]) == [], "a pair needs both systems"
    assert comparison_pairs(["sasrec", "llm zero-shot", "llm sft", "fusion"]) == [
        ("llm sft", "llm zero-shot"), ("fusion", "llm zero-shot"), ("fusion", "llm sft")]


def test_compare_systems_pairs_the_rows_both_were_scored_on():
    per_example = {"llm sft": {"ndcg@10": np.array([0.0, 1.0, 0.5]), "hr@1": np.array([0.0, 1.0, 0.0])},
                   "llm sft+sdpo": {"ndcg@10": np.array([1.0, 1.0]), "hr@1": np.array([1.0, 1.0])}}
    rows = {"llm sft": np.array([4, 5, 6]), "llm sft+sdpo": np.array([5, 6])}
    out = compare_systems(per_example, rows, EvalConfig(num_resamples=100))
    assert [(c["system"], c["baseline"], c["metric"], c["rows"]) for c in out] == [
        ("llm sft+sdpo", "llm sft", "ndcg@10", 2), ("llm sft+sdpo", "llm sft", "hr@1", 2)]
    assert out[0]["diff"] == pytest.approx(0.25) and out[1]["diff"] == pytest.approx(0.5)  # rows 5 and 6 only
    table = comparisons_table(out, 0.95)
    assert "| llm sft+sdpo | llm sft | 2 | +0.2500 [" in table and "Δhr@1" in table
    assert comparisons_table([], 0.95) == ""
