"""Preference losses: hand-worked values and gradients, K=1 equivalence, masked negatives, S-DPO stability, and TRL's
DPO as the oracle."""

import math

import pytest
import torch

from recalign.align.losses import LOSS_TYPES, preference_loss, reward_stats


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_hand_computed_values_for_two_negatives():
    """beta = 0.5; policy/reference log-probs chosen -1/-2, rejected [-3, -1]/[-2, -2]:
    r_w = 0.5 * (-1 + 2) = 0.5; r_l = 0.5 * ([-3, -1] + 2) = [-0.5, 0.5].
    DPO (pairwise mean) = mean(softplus(r_l - r_w)) = (softplus(-1) + softplus(0)) / 2 = (0.313262 + 0.693147) / 2
                        = 0.503204
    DMPO = softplus(mean(r_l) - r_w) = softplus(-0.5) = 0.474077
    SDPO = softplus(log(exp(-1) + exp(0))) = softplus(0.313262) = log(1 + 1.367879) = 0.861995
    """
    args = (torch.tensor([-1.0]), torch.tensor([[-3.0, -1.0]]), torch.tensor([-2.0]), torch.tensor([[-2.0, -2.0]]), 0.5)
    expected = {"dpo_pairwise_mean": 0.503204, "dmpo": 0.474077, "sdpo": 0.861995}
    assert expected["dpo_pairwise_mean"] == pytest.approx((_softplus(-1) + _softplus(0)) / 2, abs=1e-6)
    assert expected["sdpo"] == pytest.approx(_softplus(math.log(math.exp(-1) + 1)), abs=1e-6)
    for loss_type, value in expected.items():
        losses, chosen, rejected = preference_loss(*args, loss_type)
        assert losses.shape == (1,)
        assert losses.item() == pytest.approx(value, abs=1e-5), loss_type
        assert chosen.tolist() == pytest.approx([0.5])
        assert rejected.tolist() == [pytest.approx([-0.5, 0.5])]


def test_per_example_shapes_and_batch_independence():
    torch.manual_seed(0)
    pc, rc = torch.randn(4), torch.randn(4)
    pr, rr = torch.randn(4, 3), torch.randn(4, 3)
    for loss_type in set(LOSS_TYPES) - {"dpo"}:
        losses, chosen, rejected = preference_loss(pc, pr, rc, rr, 0.1, loss_type)
        assert losses.shape == (4,) and chosen.shape == (4,) and rejected.shape == (4, 3)
        alone = preference_loss(pc[2:3], pr[2:3], rc[2:3], rr[2:3], 0.1, loss_type)[0]
        assert alone.item() == pytest.approx(losses[2].item(), abs=1e-7)


def test_all_three_equal_dpo_at_one_negative():
    torch.manual_seed(1)
    pc, rc, pr, rr = torch.randn(16) * 5, torch.randn(16) * 5, torch.randn(16, 1) * 5, torch.randn(16, 1) * 5
    beta = 0.3
    dpo_by_hand = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr[:, 0] - rr[:, 0])))
    for loss_type in LOSS_TYPES:
        losses = preference_loss(pc, pr, rc, rr, beta, loss_type)[0]
        torch.testing.assert_close(losses, dpo_by_hand, rtol=1e-6, atol=1e-6)


def test_dpo_is_best_vs_worst_and_its_k_negative_variant_is_the_mean_of_pairwise_losses():
    torch.manual_seed(2)
    pc, rc, pr, rr = torch.randn(5), torch.randn(5), torch.randn(5, 4), torch.randn(5, 4)
    pairwise = torch.stack([preference_loss(pc, pr[:, k:k + 1], rc, rr[:, k:k + 1], 0.7, "dpo")[0] for k in range(4)])
    torch.testing.assert_close(preference_loss(pc, pr, rc, rr, 0.7, "dpo_pairwise_mean")[0], pairwise.mean(dim=0))
    with pytest.raises(ValueError, match="best vs worst"):
        preference_loss(pc, pr, rc, rr, 0.7, "dpo")


def test_gradients_differ_as_the_formulas_say_once_the_rewards_differ():
    """d loss / d r_l_i with r = beta * (policy - reference) logps, beta = 1, K = 3:
    pairwise mean: sigmoid(r_l_i - r_w) / K;  DMPO: sigmoid(mean r_l - r_w) / K, the same for every i;
    S-DPO: sigmoid(lse) * softmax_i(r_l - r_w) with lse = logsumexp_i(r_l_i - r_w).
    At step 0 (policy = reference, every r = 0) all three weigh the negatives equally, so their gradients are
    positive multiples of one vector and only the step size differs; at a gap they point apart."""
    reference_c, reference_r = torch.zeros(1), torch.zeros(1, 3)

    def grads(rejected: list[float]) -> dict[str, torch.Tensor]:
        out = {}
        for loss_type in ("dpo_pairwise_mean", "dmpo", "sdpo"):
            policy_r = torch.tensor([rejected], requires_grad=True)
            preference_loss(torch.zeros(1), policy_r, reference_c, reference_r, 1.0, loss_type)[0].sum().backward()
            out[loss_type] = policy_r.grad[0]
        return out

    same = grads([0.0, 0.0, 0.0])
    for g in same.values():
        assert torch.allclose(g, g[0].expand(3)), "equal weights at step 0"
    assert same["sdpo"][0].item() == pytest.approx(1 / 4)  # sigmoid(log 3) / 3
    assert same["dmpo"][0].item() == pytest.approx(0.5 / 3) == same["dpo_pairwise_mean"][0].item()

    gap = [2.0, 0.0, -1.0]
    apart = grads(gap)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert apart["dpo_pairwise_mean"].tolist() == pytest.approx([sig(g) / 3 for g in gap], abs=1e-6)
    assert apart["dmpo"].tolist() == pytest.approx([sig(sum(gap) / 3) / 3] * 3, abs=1e-6)
    lse = math.log(sum(math.exp(g) for g in gap))
    assert apart["sdpo"].tolist() == pytest.approx([sig(lse) * math.exp(g - lse) for g in gap], abs=1e-6)
    unit = {k: v / v.norm() for k, v in apart.items()}
    assert (unit["sdpo"] - unit["dmpo"]).norm() > 0.3 and (unit["sdpo"] - unit["dpo_pairwise_mean"]).norm() > 0.1


def test_masked_negatives_give_the_loss_of_the_rows_own_k():
    torch.manual_seed(3)
    pc, rc, pr, rr = torch.randn(2), torch.randn(2), torch.randn(2, 3), torch.randn(2, 3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    for loss_type in ("dpo_pairwise_mean", "dmpo", "sdpo"):
        losses = preference_loss(pc, pr, rc, rr, 0.5, loss_type, mask)[0]
        first = preference_loss(pc[:1], pr[:1, :2], rc[:1], rr[:1, :2], 0.5, loss_type)[0]
        second = preference_loss(pc[1:], pr[1:, :1], rc[1:], rr[1:, :1], 0.5, loss_type)[0]
        torch.testing.assert_close(losses, torch.cat([first, second]))
    stats = reward_stats(*preference_loss(pc, pr, rc, rr, 0.5, "sdpo", mask)[1:], mask)
    alone = reward_stats(*preference_loss(pc[1:], pr[1:, :1], rc[1:], rr[1:, :1], 0.5, "sdpo")[1:])
    assert stats["margin"][1].item() == pytest.approx(alone["margin"][0].item())
    with pytest.raises(ValueError, match="at least one rejected"):
        preference_loss(pc, pr, rc, rr, 0.5, "sdpo", torch.tensor([[True, False, False], [False, False, False]]))


def test_sdpo_stays_finite_with_huge_log_ratio_gaps():
    """Gaps of 1e4 overflow exp() in float32 (and float64); logsumexp + softplus must not."""
    policy_chosen = torch.tensor([0.0, 0.0, 1e4], requires_grad=True)
    policy_rejected = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [0.0, 0.0, 0.0]], requires_grad=True)
    zeros_c, zeros_r = torch.zeros(3), torch.zeros(3, 3)
    losses = preference_loss(policy_chosen, policy_rejected, zeros_c, zeros_r, 1.0, "sdpo")[0]
    assert torch.isfinite(losses).all()
    # row 0: a negative 1e4 above the chosen -> loss ~ 1e4; row 1/2: chosen far ahead -> loss ~ 0
    assert losses[0].item() == pytest.approx(1e4, rel=1e-6)
    assert losses[1].item() == pytest.approx(0.0, abs=1e-6) and losses[2].item() == pytest.approx(0.0, abs=1e-6)
    losses.sum().backward()
    assert torch.isfinite(policy_chosen.grad).all() and torch.isfinite(policy_rejected.grad).all()
    assert policy_chosen.grad[0].item() == pytest.approx(-1.0, abs=1e-6)  # d/dr_w of ~(r_l - r_w)
    for loss_type in ("dpo_pairwise_mean", "dmpo"):
        losses = preference_loss(policy_chosen, policy_rejected, zeros_c, zeros_r, 1.0, loss_type)[0]
        assert torch.isfinite(losses).all()


def test_reward_stats():
    chosen = torch.tensor([1.0, 0.0])
    rejected = torch.tensor([[0.0, 2.0], [-1.0, -2.0]])
    stats = reward_stats(chosen, rejected)
    assert stats["accuracy"].tolist() == [0.5, 1.0]
    assert stats["accuracy_all"].tolist() == [0.0, 1.0]
    assert stats["margin"].tolist() == [0.0, 1.5]
    assert stats["rejected"].tolist() == [1.0, -1.5]


def test_bad_inputs_raise():
    c, r = torch.zeros(2), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(c, r, c, r, 0.1, "ipo")
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        preference_loss(c, torch.zeros(2), c, torch.zeros(2), 0.1, "dmpo")
    with pytest.raises(ValueError, match="reference_rejected_logps"):
        preference_loss(c, r, c, torch.zeros(2, 2), 0.1, "sdpo")


def test_pairwise_loss_equals_trl_dpo_trainer(tiny_llama_dir, tmp_path):
    """TRL's DPOTrainer (sigmoid loss, PEFT reference = adapter disabled) on the same LoRA model and batch:
    its compute_loss must equal our packed shared-prompt log-probs + preference_loss("dpo"), value and gradient."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from recalign.align.logprobs import EncodedExample, collate, encode_example, packed_logps
    from recalign.align.loop import reference_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    header = "<|im_start|>assistant\n"
    rows = [
        {"prompt": "<|im_start|>user\nThe user enjoys dramas and thrillers.<|im_end|>\n" + header,
         "chosen": "Toy Story (1995)", "rejected": "GoldenEye (1995), Action"},
        {"prompt": "<|im_start|>user\nCandidates A B C. Answer with one letter.<|im_end|>\n" + header,
         "chosen": "B. Copycat (1995)", "rejected": "A"},
        {"prompt": "<|im_start|>system\nRated 5 out of 5.<|im_end|>\n<|im_start|>user\nGenres?<|im_end|>\n" + header,
         "chosen": "Drama, Thriller", "rejected": "Comedy, Musical, Western"},
    ]
    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so the policy differs from the reference and the loss is not log 2
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"],
                      init_lora_weights=False)
    args = DPOConfig(output_dir=str(tmp_path), beta=0.5, loss_type=["sigmoid"], use_cpu=True, report_to=[],
                     max_length=None, per_device_train_batch_size=3)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora)
    model = trainer.model
    model.eval()
    features = [trainer.train_dataset[i] for i in range(len(rows))]

    trl_loss = trainer.compute_loss(model, trainer.data_collator(features))
    trl_grads = torch.autograd.grad(trl_loss, [p for p in model.parameters() if p.requires_grad])

    ours = [encode_example(tokenizer, r["prompt"], [r["chosen"], r["rejected"]], 512, 512) for r in rows]
    assert [(e.prompt_ids, e.completion_ids) for e in ours] == \
        [(f["prompt_ids"], [f["chosen_ids"], f["rejected_ids"]]) for f in features], "same tokens as TRL"
    batch = collate([EncodedExample(f["prompt_ids"], [f["chosen_ids"], f["rejected_ids"]]) for f in features],
                    tokenizer.pad_token_id)
    policy = packed_logps(model, **batch.tensors())
    reference = reference_logps(model, batch)
    loss = preference_loss(policy[:, 0], policy[:, 1:], reference[:, 0], reference[:, 1:], 0.5, "dpo")[0].mean()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    assert abs(trl_loss.item() - math.log(2)) > 1e-3, "policy equals reference: the comparison would be vacuous"
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for ours_grad, trl_grad in zip(grads, trl_grads):
        torch.testing.assert_close(ours_grad, trl_grad, rtol=1e-4, atol=1e-5)
