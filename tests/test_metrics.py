"""Ranking metrics against values worked out by hand, ties included."""

import math

import numpy as np
import pytest
import torch

from recalign import metrics


def test_rank_hr_ndcg_mrr_by_hand():
    # Row 0: target col 1 scores 0.9, one candidate (0.95) above it -> rank 2.
    # Row 1: target col 0 is the best -> rank 1.
    # Row 2: target col 2 scores 0.1, the lowest of 4 -> rank 4.
    scores = torch.tensor([[0.2, 0.9, 0.95, 0.1], [5.0, 1.0, 2.0, 3.0], [0.4, 0.3, 0.1, 0.2]])
    target = torch.tensor([1, 0, 2])
    assert metrics.target_rank(scores, target).tolist() == [2, 1, 4]
    assert metrics.hr_at_k(scores, target, 1).tolist() == [0.0, 1.0, 0.0]
    assert metrics.hr_at_k(scores, target, 2).tolist() == [1.0, 1.0, 0.0]
    # NDCG@k = 1/log2(rank+1): rank 2 -> 1/log2(3) = 0.63093; rank 1 -> 1; rank 4 > k=3 -> 0.
    assert metrics.ndcg_at_k(scores, target, 3).tolist() == pytest.approx([1 / math.log2(3), 1.0, 0.0])
    assert metrics.ndcg_at_k(scores, target, 4).tolist() == pytest.approx([0.63093, 1.0, 1 / math.log2(5)], abs=1e-5)
    assert metrics.mrr(scores, target).tolist() == pytest.approx([0.5, 1.0, 0.25])


def test_ties_count_against_the_target():
    # All equal: the target ranks last (C = 5), never first.
    flat = torch.zeros(2, 5)
    target = torch.tensor([0, 3])
    assert metrics.target_rank(flat, target).tolist() == [5, 5]
    assert metrics.hr_at_k(flat, target, 1).tolist() == [0.0, 0.0]
    assert metrics.hr_at_k(flat, target, 4).tolist() == [0.0, 0.0]
    assert metrics.mrr(flat, target).tolist() == pytest.approx([0.2, 0.2])
    # One tie with a single other candidate above: target 0.5 ties col 2, col 0 is higher -> rank 3.
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
    assert metrics.target_rank(scores, torch.tensor([1])).tolist() == [3]
    assert metrics.ndcg_at_k(scores, torch.tensor([1]), 10).tolist() == pytest.approx([0.5])  # 1/log2(4)


def test_absent_target_scores_zero():
    scores = torch.tensor([[0.3, 0.2], [0.1, 0.9]])
    target = torch.tensor([-1, 1])
    assert metrics.hr_at_k(scores, target, 5).tolist() == [0.0, 1.0]
    assert metrics.ndcg_at_k(scores, target, 5).tolist() == [0.0, 1.0]
    assert metrics.mrr(scores, target).tolist() == [0.0, 1.0]


def test_bad_shapes_and_nan_raise():
    with pytest.raises(ValueError, match="scores must be"):
        metrics.hr_at_k(torch.zeros(3), torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="NaN"):
        metrics.mrr(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="out of range"):
        metrics.mrr(torch.tensor([[0.0, 1.0]]), torch.tensor([2]))


def test_compute_names_and_numpy_inputs():
    out = metrics.compute(np.array([[1.0, 2.0, 3.0]]), np.array([1]), ("hr@1", "hr@2", "ndcg@2", "mrr"))
    assert out["hr@1"].tolist() == [0.0]
    assert out["hr@2"].tolist() == [1.0]
    assert out["ndcg@2"].tolist() == pytest.approx([1 / math.log2(3)])
    assert out["mrr"].tolist() == [0.5]
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.compute(np.zeros((1, 2)), np.array([0]), ("recall@5",))


def test_random_scores_match_expectation():
    rng = np.random.default_rng(0)
    scores = rng.random((20000, 20))
    target = rng.integers(0, 20, 20000)
    expected = metrics.random_expectation(20, 10)
    assert metrics.hr_at_k(scores, target, 10).mean().item() == pytest.approx(expected["hr@10"], abs=0.01)
    assert metrics.ndcg_at_k(scores, target, 10).mean().item() == pytest.approx(expected["ndcg@10"], abs=0.01)
    assert expected["ndcg@10"] == pytest.approx(0.2266, abs=1e-3)  # PAPERS.md: random NDCG@10 0.227


def test_paired_bootstrap():
    a = np.array([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0] * 50)
    b = np.array([0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0] * 50)
    out = metrics.paired_bootstrap(a, b, num_resamples=1000)
    assert out["diff"] == pytest.approx(0.375)  # 6/8 - 3/8
    assert out["low"] < 0.375 < out["high"]
    assert out["low"] > 0.3 and out["p_value"] < 0.01
    same = metrics.paired_bootstrap(a, a, num_resamples=200)
    assert same["diff"] == 0.0 and same["low"] == 0.0 and same["high"] == 0.0
    mean, low, high = metrics.bootstrap_ci(b, num_resamples=500)
    assert mean == pytest.approx(0.375)
    assert low < mean < high
    with pytest.raises(ValueError):
        metrics.paired_bootstrap(a, b[:-1])
