"""KA-SASRec against its controls: rows restricted to users with analyses, the per-sample average worked out by
hand, own against another user's analyses (a derangement) against none, the reference chosen by the config."""

import numpy as np
import pytest
import torch

from recalign import metrics
from recalign.data.dataset import Dataset
from recalign.recsys.ka_sasrec import KAConfig, KASASRec
from recalign.recsys.ka_train import catalogue_logp, score_with_knowledge
from recalign.recsys.knowledge import KnowledgeTable
from recalign.recsys.sasrec import SASRec, SASRecConfig
from recalign.reward.validation import CompareConfig, compare_on_valid, derangement, knowledge_gain, per_sample

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


def test_per_sample_averages_each_rows_own_samples(setup):
    data, ka, knowledge = setup
    valid = data.split("valid").subset(np.arange(10))
    got = per_sample(ka, valid, knowledge.vectors[valid.user_idx], knowledge.present[valid.user_idx], ("mrr",))
    for row in (0, 3):
        samples = np.nonzero(knowledge.present[valid.user_idx[row]])[0]
        one = valid.subset(np.array([row]))
        by_hand = np.mean([metrics.compute(score_with_knowledge(
            ka, one.history, one.candidates, knowledge.vectors[valid.user_idx[row], j][None], np.ones(1, dtype=bool)),
            one.target_index, ("mrr",))["mrr"][0] for j in samples])
        assert got["mrr"][row] == pytest.approx(by_hand)
        logp = np.mean([catalogue_logp(ka, one.history, one.target, knowledge.vectors[valid.user_idx[row], j][None])[0]
                        for j in samples])
        assert got["logp"][row] == pytest.approx(logp)
    with pytest.raises(ValueError, match="at least one sample"):
        per_sample(ka, valid, knowledge.vectors[valid.user_idx], np.zeros((10, 3), dtype=bool), ("mrr",))


def test_derangement_gives_every_user_another_users_analyses():
    for n in (2, 3, 10, 101):
        perm = derangement(n, seed=n)
        assert sorted(perm.tolist()) == list(range(n)) and not (perm == np.arange(n)).any()
    assert np.array_equal(derangement(10, 1), derangement(10, 1))
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0)


def test_knowledge_gain_compares_own_shuffled_and_none_on_a_held_out_target(setup):
    data, ka, knowledge = setup
    gain = knowledge_gain(ka, data, knowledge, "train", CompareConfig(num_resamples=100))
    assert gain["split"] == "train" and gain["num_users"] == 10
    split = data.split("train").subset(np.arange(10))
    none = catalogue_logp(ka, split.history, split.target, None)
    assert gain["logp"]["none"] == pytest.approx(none.mean())
    for metric in ("logp", "ndcg@10"):
        g = gain[metric]
        assert g["own_vs_none"]["diff"] == pytest.approx(g["own"] - g["none"])
        assert g["own_vs_shuffled"]["diff"] == pytest.approx(g["own"] - g["shuffled"])
        assert g["own_vs_none"]["low"] <= g["own_vs_none"]["diff"] <= g["own_vs_none"]["high"]
    assert gain["logp"]["own"] != gain["logp"]["shuffled"], "each user reads someone else's analyses"


def test_compare_on_valid_scores_the_users_with_knowledge_against_the_reference(setup):
    data, ka, knowledge = setup
    baseline = SASRec(data.num_items, MODEL).eval()
    result = compare_on_valid(data, knowledge, ka, None, CompareConfig(plain_control=False, num_resamples=50),
                              baseline)
    assert result["num_users_with_knowledge"] == 10 and result["num_valid_users"] == data.num_users
    assert result["reference"] == "ka_sasrec_no_knowledge" and result["split"] == "valid"
    assert set(result["systems"]) == {"ka_sasrec", "ka_sasrec_per_sample", "ka_sasrec_shuffled",
                                      "ka_sasrec_no_knowledge", "sasrec_baseline"}
    assert all(s["num_rows"] == 10 for s in result["systems"].values())
    with_plain = compare_on_valid(data, knowledge, ka, ka, CompareConfig(num_resamples=50))
    assert with_plain["reference"] == "plain_sasrec"
    assert with_plain["systems"]["plain_sasrec"]["mrr"]["mean"] == pytest.approx(
        with_plain["systems"]["ka_sasrec_no_knowledge"]["mrr"]["mean"]), "same weights, no text: same scores"
    empty = KnowledgeTable(knowledge.vectors, np.zeros_like(knowledge.present))
    with pytest.raises(ValueError, match="no validation user has sampled analyses"):
        compare_on_valid(data, empty, ka, None, CompareConfig())
