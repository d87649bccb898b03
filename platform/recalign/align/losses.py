"""Preference losses over summed completion log-probabilities: DPO, DMPO and S-DPO with K negatives.

Pure tensor functions. Every completion y is scored by its implicit reward
    r(y) = beta * (log pi_theta(y | x) - log pi_ref(y | x)),
with log pi(y | x) the sum of the completion's token log-probabilities. For one chosen y_w and K
rejected y_l_1..y_l_K:
- DPO (Rafailov et al., arXiv 2305.18290):  L = -log sigmoid(r(y_w) - r(y_l)), K = 1 (RLRF4Rec's best vs
  worst); `dpo_pairwise_mean` is the mean of the K pairwise DPO losses, a named variant for K > 1.
- DMPO (Bai et al., arXiv 2405.16127):      L = -log sigmoid(r(y_w) - (1/K) * sum_i r(y_l_i)).
  (The public DMPO repo trains K plain DPO pairs instead; this is the paper's formula.)
- S-DPO (Chen et al., arXiv 2406.09215):    L = -log sigmoid(-log sum_i exp(r(y_l_i) - r(y_w)))
                                             = softplus(logsumexp_i(r(y_l_i) - r(y_w))).
  Written with logsumexp + softplus, so reward gaps of 1e4 stay finite (the public code sums raw exp()).
At K = 1 all of them are the same function. A row may hold fewer than K negatives (a mask says which):
sums and means then run over its own. -log sigmoid(z) is computed as softplus(-z) throughout.
The SFT warm-up's listwise loss (`listwise_loss`, LlamaRec) is the cross-entropy of a softmax over an
example's completions, the chosen the label: for re-rank letters, over the C candidates' letter logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("dpo", "dpo_pairwise_mean", "dmpo", "sdpo")


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str,
    rejected_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference losses and the implicit rewards.

    Args:
        policy_chosen_logps: (B,) summed log pi_theta(y_w | x).
        policy_rejected_logps: (B, K) summed log pi_theta(y_l_i | x), K >= 1.
        reference_chosen_logps: (B,) summed log pi_ref(y_w | x).
        reference_rejected_logps: (B, K) summed log pi_ref(y_l_i | x).
        beta: KL strength of the implicit reward.
        loss_type: "dpo" (K = 1, best vs worst, as RLRF4Rec), "dpo_pairwise_mean" (the mean of the K pairwise
            DPO losses), "dmpo" or "sdpo".
        rejected_mask: (B, K) bool, which negatives exist (rows with fewer than K are padded); None = all. Each row
            needs at least one. Sums and means run over a row's own negatives: the formulas with K_b = its count.

    Returns:
        losses: (B,) per-example loss (differentiable).
        chosen_rewards: (B,) beta * log-ratio of the chosen completion (detached, for logging).
        rejected_rewards: (B, K) beta * log-ratio of each rejected completion (detached; 0 where masked).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    _check_shapes(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    mask = _mask(rejected_mask, policy_rejected_logps)
    if loss_type == "dpo" and mask.shape[1] != 1:
        raise ValueError("loss_type=dpo is best vs worst (K=1); for K > 1 use dpo_pairwise_mean, dmpo or sdpo")
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps) * mask  # (B, K), 0 where absent
    count = mask.sum(dim=-1)  # (B,) K_b
    if loss_type in ("dpo", "dpo_pairwise_mean"):
        # mean over the row's negatives of -log sigmoid(r_w - r_l_i)
        losses = (F.softplus(rejected_rewards - chosen_rewards[:, None]) * mask).sum(dim=-1) / count
    elif loss_type == "dmpo":
        # -log sigmoid(r_w - mean_i r_l_i)
        losses = F.softplus(rejected_rewards.sum(dim=-1) / count - chosen_rewards)
    else:
        # softplus(logsumexp_i(r_l_i - r_w)): the softmax over {y_w, y_l_1..K_b} in log space
        gaps = (rejected_rewards - chosen_rewards[:, None]).masked_fill(~mask.bool(), float("-inf"))
        losses = F.softplus(torch.logsumexp(gaps, dim=-1))
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def reward_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                 rejected_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-example reward diagnostics, each (B,), over each row's own negatives (rejected_mask (B, K)).

    accuracy: share of the negatives the chosen completion out-rewards (TRL's rewards/accuracies at K=1);
    accuracy_all: 1 if the chosen completion out-rewards every negative;
    margin: r(y_w) minus the mean negative reward; rejected: the mean negative reward.
    """
    mask = _mask(rejected_mask, rejected_rewards)
    count = mask.sum(dim=-1)
    wins = (chosen_rewards[:, None] > rejected_rewards).float() * mask  # (B, K)
    rejected = (rejected_rewards * mask).sum(dim=-1) / count
    return {
        "accuracy": wins.sum(dim=-1) / count,
        "accuracy_all": (wins.sum(dim=-1) == count).float(),
        "chosen": chosen_rewards,
        "rejected": rejected,
        "margin": chosen_rewards - rejected,
    }


def _mask(rejected_mask: torch.Tensor | None, rejected: torch.Tensor) -> torch.Tensor:
    if rejected_mask is None:
        return torch.ones_like(rejected)
    if rejected_mask.shape != rejected.shape:
        raise ValueError(f"rejected_mask {tuple(rejected_mask.shape)} != rejected {tuple(rejected.shape)}")
    if not rejected_mask.any(dim=-1).all():
        raise ValueError("every example needs at least one rejected completion")
    return rejected_mask.to(rejected.dtype)


def _check_shapes(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                  reference_rejected: torch.Tensor) -> None:
    if policy_chosen.dim() != 1:
        raise ValueError(f"policy_chosen_logps must be (B,), got {tuple(policy_chosen.shape)}")
    batch = policy_chosen.shape[0]
    if policy_rejected.dim() != 2 or policy_rejected.shape[0] != batch or policy_rejected.shape[1] < 1:
        raise ValueError(f"policy_rejected_logps must be (B={batch}, K>=1), got {tuple(policy_rejected.shape)}")
    if reference_chosen.shape != policy_chosen.shape:
        raise ValueError(f"reference_chosen_logps {tuple(reference_chosen.shape)} != policy_chosen_logps "
                         f"{tuple(policy_chosen.shape)}")
    if reference_rejected.shape != policy_rejected.shape:
        raise ValueError(f"reference_rejected_logps {tuple(reference_rejected.shape)} != policy_rejected_logps "
                         f"{tuple(policy_rejected.shape)}")


def listwise_loss(logps: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of a softmax over each row's completions, the chosen (column 0) the label, and whether the
    chosen scored above every other (b,) each. logps (b, N) summed log-probs, present (b, N) bool. A re-rank
    completion is one letter token, so log p(letter) = logit - logsumexp(vocabulary): the vocabulary term cancels
    and this is the softmax over the candidates' letter logits at the answer position (LlamaRec)."""
    scores = logps.float().masked_fill(~present, float("-inf"))
    losses = torch.logsumexp(scores, dim=1) - scores[:, 0]
    top1 = (scores[:, 1:] < scores[:, :1]).all(dim=1)
    return losses, top1
