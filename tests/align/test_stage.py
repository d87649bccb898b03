"""The align stage's plan: SFT once, then every loss from it; a sweep's best reaches the preference policies."""

import pytest

from recalign.align.config import AlignConfig, PoliciesConfig
from recalign.align.stage import plan_policies


def test_policy_plan_trains_sft_once_then_every_loss_from_it():
    cfg = PoliciesConfig(loss_types=["dpo", "sdpo"], rerank=AlignConfig(sft_max_steps=4, max_steps=3, beta=0.5,
                                                                         num_negatives=3))
    plan = plan_policies(cfg)
    assert [(label, init) for label, _, init in plan] == [
        ("knowledge/dpo", ""), ("knowledge/sdpo", ""), ("rerank/sft", ""),
        ("rerank/sft+dpo", "rerank/sft"), ("rerank/sft+sdpo", "rerank/sft")]
    align = {label: a for label, a, _ in plan}
    sft = align["rerank/sft"]
    assert (sft.sft_max_steps, sft.max_steps, sft.num_train_epochs, sft.num_negatives) == (4, 0, 0, 1)
    assert (align["rerank/sft+sdpo"].sft_max_steps, align["rerank/sft+sdpo"].max_steps) == (0, 3)
    assert align["rerank/sft+sdpo"].loss_type == "sdpo" and align["knowledge/dpo"].sft_max_steps == 0
    # DPO is best vs worst (K=1); the K-negative losses keep the path's K.
    assert align["rerank/sft+dpo"].num_negatives == align["knowledge/dpo"].num_negatives == 1
    assert align["rerank/sft+sdpo"].num_negatives == 3
    # A sweep's best beta and K reach the re-rank preference policies, and never retrain the SFT policy.
    swept = {label: a for label, a, _ in plan_policies(cfg, AlignConfig(beta=0.1, num_negatives=1))}
    assert (swept["rerank/sft+sdpo"].beta, swept["rerank/sft+sdpo"].num_negatives) == (0.1, 1)
    assert swept["rerank/sft"] == sft and swept["knowledge/dpo"] == align["knowledge/dpo"]
    no_sft = plan_policies(PoliciesConfig(paths=["rerank"], loss_types=["dmpo"], rerank=AlignConfig()))
    assert [(label, init) for label, _, init in no_sft] == [("rerank/dmpo", "")]
    with pytest.raises(ValueError, match="loss_types"):
        PoliciesConfig(loss_types=["ipo"])


def test_dpo_takes_one_negative_and_the_sweep_says_why():
    from recalign.align.config import SweepConfig

    with pytest.raises(ValueError, match="best vs worst"):
        AlignConfig(loss_type="dpo", num_negatives=3)
    assert AlignConfig(loss_type="dpo_pairwise_mean", num_negatives=3).num_negatives == 3
    with pytest.raises(ValueError, match="dpo, which takes K=1"):
        SweepConfig(loss_types=["dpo"], num_negatives=[1, 3])
