"""Score fusion: per-row standardisation, the fused score, and the weight chosen on validation rows."""

import numpy as np
import pytest

from recalign.rerank.fusion import FusionConfig, choose_weight, fuse, standardise


def test_standardise_rows_and_constant_rows():
    z = standardise(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    assert np.allclose(z[0].mean(), 0) and np.allclose(z[0].std(), 1) and (z[1] == 0).all()
    # the scale and offset of a system's scores do not matter, only their order and spread within a row
    scores = np.random.default_rng(0).normal(size=(4, 6))
    assert np.allclose(standardise(scores), standardise(10 * scores - 3))


def test_fuse_is_sasrec_at_zero_and_checks_shapes():
    rng = np.random.default_rng(1)
    sasrec, llm = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    assert np.allclose(fuse(sasrec, llm, 0.0), standardise(sasrec))
    assert np.allclose(fuse(sasrec, llm, 2.0), standardise(sasrec) + 2 * standardise(llm))
    with pytest.raises(ValueError, match="differ in shape"):
        fuse(sasrec, llm[:, :3], 1.0)


def test_the_weight_follows_what_the_re_ranker_knows():
    rng = np.random.default_rng(2)
    rows, c = 400, 10
    target = rng.integers(0, c, size=rows)
    onehot = np.eye(c)[target]
    sasrec = rng.normal(size=(rows, c)) + 1.0 * onehot  # a weak recommender
    informed = rng.normal(size=(rows, c)) + 1.5 * onehot  # a re-ranker that knows something else
    weight, grid = choose_weight(sasrec, informed, target, FusionConfig())
    assert weight > 0 and grid[weight] > grid[0.0]
    # a re-ranker that knows nothing SASRec does not: its scores are SASRec's, any weight ties, 0 wins
    weight, grid = choose_weight(sasrec, sasrec * 3 + 1, target, FusionConfig())
    assert weight == 0.0 and len(set(round(v, 12) for v in grid.values())) == 1


def test_fusion_config_needs_zero_in_the_grid():
    with pytest.raises(ValueError, match="must hold 0"):
        FusionConfig(weights=[0.5, 1.0])
    with pytest.raises(ValueError, match=">= 0"):
        FusionConfig(weights=[0.0, -1.0])
