"""KA-SASRec against its controls on validation: rows restricted to users with analyses, the per-sample
average worked out by hand, the reference chosen by the config."""

import numpy as np
import pytest
import torch

from recalign import metrics
from recalign.data.dataset import Dataset
from recalign.recsys.ka_sasrec import KAConfig, KASASRec
from recalign.recsys.ka_train import score_with_knowledge
from recalign.recsys.knowledge import KnowledgeTable
from recalign.recsys.sasrec import SASRec, SASRecConfig
from recalign.reward.validation import CompareConfig, compare_on_valid, per_sample_metrics

MODEL = SASRecConfig(hidden_size=16, num_layers=1, num_heads=2, max_len=8)


@pytest.fixture(scope="module")
def setup(tiny_data_dir):
    data = Dataset(tiny_data_dir)
    torch.manual_seed(0)
    ka = KASASRec(data.num_items, MODEL, KAConfig(adaptor_hidden=8), knowledge_dim=6).eval()
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(data.num_users, 3, 6)).astype(np.float32)
    present = np.zeros((data.num_users, 3), dtype=bool)
    present[:10, :2] = True  # users 0-9 have two analyses, the rest none
    present[3, 2] = True  # user 3 has three
    return data, ka, KnowledgeTable(vectors, present)


def test_per_sample_metrics_average_each_rows_own_samples(setup):
    data, ka, knowledge = setup
    valid = data.split("valid").subset(np.arange(10))
    got = per_sample_metrics(ka, valid.history, valid.candidates, valid.target_index,
                             knowledge.vectors[valid.user_idx], knowledge.present[valid.user_idx], ("mrr",))["mrr"]
    for row in (0, 3):
        samples = np.nonzero(knowledge.present[valid.user_idx[row]])[0]
        by_hand = np.mean([metrics.compute(score_with_knowledge(
            ka, valid.history[row:row + 1], valid.candidates[row:row + 1],
            knowledge.vectors[valid.user_idx[row], j][None], np.ones(1, dtype=bool)), valid.target_index[row:row + 1],
            ("mrr",))["mrr"][0] for j in samples])
        assert got[row] == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="at least one sample"):
        per_sample_metrics(ka, valid.history, valid.candidates, valid.target_index,
                           knowledge.vectors[valid.user_idx], np.zeros((10, 3), dtype=bool), ("mrr",))


def test_compare_on_valid_scores_the_users_with_knowledge_against_the_reference(setup):
    data, ka, knowledge = setup
    baseline = SASRec(data.num_items, MODEL).eval()
    result = compare_on_valid(data, knowledge, ka, None, CompareConfig(plain_control=False, num_resamples=50).eval_config(),
                              baseline)
    assert result["num_users_with_knowledge"] == 10 and result["num_valid_users"] == data.num_users
    assert result["reference"] == "ka_sasrec_no_knowledge" and result["split"] == "valid"
    assert set(result["systems"]) == {"ka_sasrec", "ka_sasrec_per_sample", "ka_sasrec_no_knowledge", "sasrec_baseline"}
    assert all(s["num_rows"] == 10 for s in result["systems"].values())
    with_plain = compare_on_valid(data, knowledge, ka, ka, CompareConfig(num_resamples=50).eval_config())
    assert with_plain["reference"] == "plain_sasrec"
    assert with_plain["systems"]["plain_sasrec"]["mrr"]["mean"] == pytest.approx(
        with_plain["systems"]["ka_sasrec_no_knowledge"]["mrr"]["mean"]), "same weights, no text: same scores"
    empty = KnowledgeTable(knowledge.vectors, np.zeros_like(knowledge.present))
    with pytest.raises(ValueError, match="no validation user has sampled analyses"):
        compare_on_valid(data, empty, ka, None, CompareConfig().eval_config())
