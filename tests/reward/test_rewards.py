"""Rewards: computed on each user's train target, as the catalogue log-probability (default) or NDCG@10 first
with the log-probability among the candidates only to break ties."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from recalign import metrics
from recalign.data.dataset import Dataset
from recalign.recsys.ka_sasrec import KAConfig, KASASRec
from recalign.recsys.knowledge import KnowledgeTable
from recalign.recsys.sasrec import SASRecConfig
from recalign.reward.rewards import MIN_NDCG_GAP, RewardConfig, combine, compute_rewards, summarise_rewards, target_logp


def test_target_logp_by_hand():
    # softmax([0, ln 3, 0]) = [1/5, 3/5, 1/5]
    scores = np.array([[0.0, math.log(3.0), 0.0], [1.0, 1.0, 1.0]])
    assert np.allclose(target_logp(scores, np.array([1, 2])), [math.log(3 / 5), math.log(1 / 3)])


def test_tie_break_orders_by_ndcg_first_then_probability():
    ndcg = lambda rank: 1 / math.log2(rank + 1) if rank <= 10 else 0.0  # noqa: E731
    tie = RewardConfig().tie_break
    assert MIN_NDCG_GAP == pytest.approx(1 / math.log2(10) - 1 / math.log2(11))  # 0.011968
    # rank 9 with p ~ 0 still beats rank 10 with p = 1: 0.30103 > 0.28906 + 0.01
    assert combine(np.array([ndcg(9)]), np.array([-50.0]), tie) > combine(np.array([ndcg(10)]), np.array([0.0]), tie)
    # rank 10 with p ~ 0 beats rank 11 (NDCG 0) with p = 1
    assert combine(np.array([ndcg(10)]), np.array([-50.0]), tie) > combine(np.array([0.0]), np.array([0.0]), tie)
    # same rank: the higher probability wins, by exactly tie * (p_a - p_b)
    a, b = combine(np.array([0.5, 0.5]), np.log(np.array([0.3, 0.1])), tie)
    assert a - b == pytest.approx(tie * 0.2)
    with pytest.raises(ValueError, match="tie_break"):
        RewardConfig(tie_break=0.012)


@pytest.fixture(scope="module")
def tiny(tiny_data_dir):
    data = Dataset(tiny_data_dir)
    torch.manual_seed(0)
    model = KASASRec(data.num_items, SASRecConfig(hidden_size=16, num_layers=1, num_heads=2, max_len=8),
                     KAConfig(adaptor_hidden=8), 4).eval()
    rng = np.random.default_rng(0)
    present = np.ones((data.num_users, 3), dtype=bool)
    present[2] = False  # a user without analyses gets no reward rows
    present[5, 2] = False
    table = KnowledgeTable(rng.normal(size=(data.num_users, 3, 4)).astype(np.float32) * 3, present)
    return data, model, table


def test_rewards_score_the_train_target_fed_each_sample(tiny):
    data, model, knowledge = tiny
    cfg = RewardConfig(kind="ndcg10")
    rewards = compute_rewards(model, data, knowledge, cfg).to_pandas()
    by_logp = compute_rewards(model, data, knowledge, RewardConfig()).to_pandas()
    assert np.array_equal(by_logp["reward"], by_logp["logp_catalogue"]), "the default reward is the catalogue logp"
    assert np.allclose(by_logp["logp_catalogue"], rewards["logp_catalogue"])
    assert len(rewards) == knowledge.present.sum() and 2 not in set(rewards["user_idx"])
    assert rewards.groupby("user_idx").size()[5] == 2

    # The target is each user's last training interaction (third to last overall), never valid/test.
    last_train = {u: int(seq[-1]) for u, seq in enumerate(data.train_sequences())}
    assert all(rewards["target"] == rewards["user_idx"].map(last_train))
    valid, test = data.split("valid"), data.split("test")
    assert not set(rewards["target"]) & (set(test.target.tolist()) | set(valid.target.tolist())) - set(last_train.values())

    train = data.split("train")
    row = {int(u): i for i, u in enumerate(train.user_idx)}
    for r in rewards.sample(8, random_state=0).itertuples():
        i = row[r.user_idx]
        with torch.no_grad():
            scores = model(torch.as_tensor(train.history[i:i + 1]), torch.as_tensor(train.candidates[i:i + 1]),
                           torch.as_tensor(knowledge.vectors[r.user_idx, r.sample_idx][None]))
            plain = model(torch.as_tensor(train.history[i:i + 1]), torch.as_tensor(train.candidates[i:i + 1]))
        target = torch.as_tensor(train.target_index[i:i + 1])
        assert r.ndcg10 == pytest.approx(metrics.ndcg_at_k(scores, target, 10).item())
        assert r.logp_target == pytest.approx(torch.log_softmax(scores.double(), 1)[0, target.item()].item(), abs=1e-5)
        assert r.reward == pytest.approx(r.ndcg10 + cfg.tie_break * math.exp(r.logp_target))
        assert r.target_rank == metrics.target_rank(scores, target).item()
        assert r.ndcg10_no_knowledge == pytest.approx(metrics.ndcg_at_k(plain, target, 10).item())
        with torch.no_grad():  # the target's log-probability over the whole catalogue, with and without the text
            logp = model.catalogue_logp(torch.as_tensor(train.history[i:i + 1]),
                                        torch.as_tensor(knowledge.vectors[r.user_idx, r.sample_idx][None]))
            plain_logp = model.catalogue_logp(torch.as_tensor(train.history[i:i + 1]))
        assert r.logp_catalogue == pytest.approx(logp[0, int(train.target[i])].item(), abs=1e-5)
        assert r.logp_catalogue_no_knowledge == pytest.approx(plain_logp[0, int(train.target[i])].item(), abs=1e-5)
        assert r.logp_catalogue < r.logp_target, "one item among 1,000+ is less likely than among 20"
    assert rewards["logp_target"].std() > 0  # the samples really change the scores


def test_summary_counts_and_spreads_by_hand():
    rewards = pa.table({
        "user_idx": pa.array([0, 0, 1, 1], pa.int32()), "sample_idx": pa.array([0, 1, 0, 1], pa.int32()),
        "ndcg10": [1.0, 0.5, 0.5, 0.5], "logp_target": [-1.0, -2.0, -1.0, -1.5],
        "logp_catalogue": [-4.0, -4.005, -6.0, -7.0], "reward": [1.003, 0.501, 0.504, 0.502],
        "ndcg10_no_knowledge": [0.5, 0.5, 0.0, 0.0], "logp_catalogue_no_knowledge": [-5.0, -5.0, -6.5, -6.5],
    })
    s = summarise_rewards(rewards, kind="ndcg10", num_resamples=200)
    assert s["num_users"] == 2 and s["samples_per_user"] == {"min": 2, "max": 2}
    assert s["share_best_ne_worst"] == {"reward": 1.0, "ndcg10": 0.5}
    assert s["spread_quantiles"]["ndcg10"]["q100"] == pytest.approx(0.5)
    assert s["spread_quantiles"]["reward"]["q0"] == pytest.approx(0.002)
    assert s["mean"]["best_ndcg10"] == pytest.approx(0.75) and s["mean"]["worst_ndcg10"] == pytest.approx(0.5)
    # per user: mean NDCG over samples (0.75, 0.5) minus no-knowledge (0.5, 0.0) -> 0.375
    assert s["knowledge_vs_none_on_target"]["diff"] == pytest.approx(0.375)
    # users with a usable pair per reward kind: NDCG + tie-break gaps 0.502, 0.002; catalogue logp gaps 0.005, 1.0
    assert s["usable_users"]["ndcg10"]["0.001"] == 2 and s["usable_users"]["ndcg10"]["0.01"] == 1
    assert s["usable_users"]["logp"]["0.001"] == 2 and s["usable_users"]["logp"]["0.01"] == 1
    # per user: mean catalogue logp over samples (-4.0025, -6.5) minus without knowledge (-5.0, -6.5) -> 0.49875
    assert s["knowledge_vs_none_logp"]["diff"] == pytest.approx(0.49875)
    with pytest.raises(ValueError, match="kind"):
        RewardConfig(kind="hr")
