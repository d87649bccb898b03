"""The alignment trainer's pieces without a cluster: pairs I/O, the data plan, one optimizer step."""

import numpy as np
import pytest
import torch

from recalign import io
from recalign.align.config import AlignConfig
from recalign.align.logprobs import PolicyScorer
from recalign.align.loop import Plan, build_policy, encode_pairs, precompute_reference, train_step
from recalign.align.losses import listwise_loss
from recalign.pairs.read import load_pairs
from tests.helpers.align import SMALL_ALIGN


def test_plan_shards_are_disjoint_deterministic_and_resumable():
    cfg = AlignConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2,
                      sft_num_train_epochs=1)
    plan = Plan.build(num_examples=20, cfg=cfg, world=2)
    assert (plan.steps_per_epoch, plan.sft_steps, plan.preference_steps, plan.total_steps) == (2, 2, 4, 6)
    for step in range(plan.total_steps):
        rank0 = plan.micro_batches(step, 0, 2, 2, seed=0)
        rank1 = plan.micro_batches(step, 1, 2, 2, seed=0)
        assert [len(m) for m in rank0] == [2, 2]
        assert not set(np.concatenate(rank0)) & set(np.concatenate(rank1)), "workers see different examples"
        again = Plan.build(20, cfg, 2).micro_batches(step, 0, 2, 2, seed=0)
        assert all((a == b).all() for a, b in zip(rank0, again)), "a restarted worker replays the same order"
    epoch0 = np.concatenate([np.concatenate(plan.micro_batches(s, r, 2, 2, 0)) for s in (2, 3) for r in (0, 1)])
    assert len(set(epoch0)) == 16, "one epoch visits distinct examples"
    assert Plan.build(3, cfg, 2).micro_batches(0, 1, 2, 2, 0)[0].size == 2, "fewer examples than a batch cycle"


def test_plan_learning_rate_warms_up_in_each_phase():
    cfg = AlignConfig(per_device_train_batch_size=1, max_steps=3, sft_max_steps=2, learning_rate=1e-4,
                      sft_learning_rate=2e-4, warmup_steps=2)
    plan = Plan.build(num_examples=8, cfg=cfg, world=1)
    assert [plan.phase(s) for s in range(5)] == ["sft", "sft", "preference", "preference", "preference"]
    assert [plan.learning_rate(s, cfg) for s in range(5)] == pytest.approx([1e-4, 2e-4, 5e-5, 1e-4, 1e-4])


@pytest.mark.parametrize("loss_type", ["dpo_pairwise_mean", "dmpo", "sdpo"])
def test_train_step_changes_every_lora_weight_and_no_frozen_weight(loss_type, pairs_uris, tiny_llama_dir):
    from transformers import AutoTokenizer

    cfg = AlignConfig(loss_type=loss_type, num_negatives=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                      **SMALL_ALIGN)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    examples = encode_pairs(tokenizer, load_pairs(pairs_uris, cfg.num_negatives), cfg)
    model = build_policy(str(tiny_llama_dir), cfg, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    scorer = PolicyScorer(model)
    plan = Plan.build(len(examples), cfg, world=1)
    # SFT warm-up step first (chosen only), then two preference steps against the warmed-up reference
    sums = train_step(scorer, model, optimizer, examples, plan.micro_batches(0, 0, 1, 2, 0), cfg,
                      tokenizer.pad_token_id, torch.device("cpu"), "sft", None, trainable)
    assert sums["examples"] == 4 and sums["loss_sum"] > 0
    reference = precompute_reference(model, examples, cfg, tokenizer.pad_token_id, 0, 1, torch.device("cpu"),
                                     adapter=True)
    assert reference.shape == (len(examples), 4) and (reference < 0).all()
    for step in (1, 2):
        sums = train_step(scorer, model, optimizer, examples, plan.micro_batches(step, 0, 1, 2, 0), cfg,
                          tokenizer.pad_token_id, torch.device("cpu"), "preference", reference, trainable)
        assert sums["examples"] == 4 and 0.0 <= sums["accuracy_sum"] <= 4.0
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == param.requires_grad, f"{name}: changed={changed}, trainable={param.requires_grad}"


def test_on_the_fly_reference_with_naive_path(pairs_uris, tiny_llama_dir):
    """No precomputed reference: the base model (adapter disabled) scores every step, via K+1 full sequences."""
    from transformers import AutoTokenizer

    cfg = AlignConfig(loss_type="sdpo", num_negatives=2, per_device_train_batch_size=3, prompt_sharing="none", **SMALL_ALIGN)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    examples = encode_pairs(tokenizer, load_pairs(pairs_uris, 2), cfg)
    model = build_policy(str(tiny_llama_dir), cfg, torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    first = train_step(PolicyScorer(model, "none"), model, optimizer, examples, [np.arange(3)], cfg,
                       tokenizer.pad_token_id, torch.device("cpu"), "preference", None, trainable)
    # A fresh LoRA (B = 0) is the base model: every reward is 0 and the S-DPO loss is log(1 + K).
    assert first["loss_sum"] / 3 == pytest.approx(np.log(3), abs=1e-5)
    assert first["chosen_sum"] == pytest.approx(0.0, abs=1e-6)


def test_sft_only_config_plans_no_preference_steps():
    cfg = AlignConfig(num_train_epochs=0, sft_num_train_epochs=2, per_device_train_batch_size=2)
    plan = Plan.build(num_examples=8, cfg=cfg, world=1)
    assert (plan.sft_steps, plan.preference_steps, plan.total_steps) == (8, 0, 8)
    with pytest.raises(ValueError, match="SFT-only"):
        AlignConfig(num_train_epochs=0, sft_num_train_epochs=0)


def test_policy_starts_from_an_init_adapter_of_the_same_shape(tiny_llama_dir, tmp_path):
    from recalign.align.trainer import check_adapter

    cfg = AlignConfig(seed=1, **SMALL_ALIGN)
    first = build_policy(str(tiny_llama_dir), cfg, torch.device("cpu"))
    with torch.no_grad():  # a fresh LoRA has B = 0; give every weight a value the other seed would not draw
        for name, param in first.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    first.save_pretrained(str(tmp_path / "sft"))
    check_adapter(str(tmp_path / "sft"), cfg)
    second = build_policy(str(tiny_llama_dir), AlignConfig(seed=2, **SMALL_ALIGN), torch.device("cpu"), str(tmp_path / "sft"))
    lora = {n: p for n, p in first.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p, dict(second.named_parameters())[n]) for n, p in lora.items())
    with pytest.raises(ValueError, match=r"r=4 but align asks for r=8"):
        check_adapter(str(tmp_path / "sft"), AlignConfig(**{**SMALL_ALIGN, "lora_r": 8}))
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
        check_adapter(str(tmp_path), cfg)


def test_init_adapter_and_policy_load_from_remote_run_storage(tiny_llama_dir, tmp_path, remote_root):
    """An s3://-style run root: the SFT adapter is read through pyarrow, both as an init adapter and
    as a policy to evaluate, with the same weights as from a local folder."""
    import shutil

    import pyarrow.fs as pafs

    from recalign.align.trainer import check_adapter
    from recalign.llm.policy import load_policy

    cfg = AlignConfig(seed=1, **SMALL_ALIGN)
    first = build_policy(str(tiny_llama_dir), cfg, torch.device("cpu"))
    with torch.no_grad():
        for name, param in first.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    first.save_pretrained(str(tmp_path / "sft"))
    remote = remote_root + "run/policy/rerank/sft"
    fs, path = io.resolve(remote)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(tmp_path / "sft"), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    shutil.rmtree(tmp_path / "sft")  # only the remote copy is left

    check_adapter(remote, cfg)
    second = build_policy(str(tiny_llama_dir), AlignConfig(seed=2, **SMALL_ALIGN), torch.device("cpu"), remote)
    lora = {n: p for n, p in first.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p, dict(second.named_parameters())[n]) for n, p in lora.items())
    merged, _ = load_policy(str(tiny_llama_dir), remote)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        np.testing.assert_allclose(merged(ids).logits.numpy(), first.eval()(ids).logits.numpy(), atol=1e-4)
    with pytest.raises(FileNotFoundError, match="mem://run/policy/rerank/none: not a PEFT adapter"):
        check_adapter(remote_root + "run/policy/rerank/none", cfg)


def test_bf16_mixed_precision_keeps_fp32_weights_and_tracks_the_fp32_loss(pairs_uris, tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    sums = {}
    for precision in ("no", "bf16"):
        cfg = AlignConfig(loss_type="sdpo", num_negatives=2, per_device_train_batch_size=2, bf16=precision == "bf16",
                          **SMALL_ALIGN)
        examples = encode_pairs(tokenizer, load_pairs(pairs_uris, 2), cfg)
        model = build_policy(str(tiny_llama_dir), cfg, torch.device("cpu"))
        trainable = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in trainable]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
        reference = precompute_reference(model, examples, cfg, tokenizer.pad_token_id, 0, 1, torch.device("cpu"),
                                         adapter=False)
        sums[precision] = train_step(PolicyScorer(model), model, optimizer, examples, [np.arange(2)], cfg,
                                     tokenizer.pad_token_id, torch.device("cpu"), "preference", reference, trainable)
        assert all(p.dtype == torch.float32 for p in trainable), "master weights stay fp32"
        assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainable))
    # A fresh LoRA is the base model: both precisions start at the S-DPO loss log(1 + K) up to bf16 rounding.
    assert sums["no"]["loss_sum"] / 2 == pytest.approx(np.log(3), abs=1e-5)
    assert sums["bf16"]["loss_sum"] / 2 == pytest.approx(np.log(3), abs=0.05)


def test_listwise_sft_is_the_softmax_over_the_letter_logits(pairs_uris, tiny_llama_dir):
    """On letter completions the listwise loss equals cross-entropy over the letters' logits at the answer
    position (the vocabulary's normaliser cancels), and missing completions are left out of the softmax."""
    from transformers import AutoTokenizer

    from recalign.align.logprobs import collate
    from recalign.rerank.scorer import letter_token_ids

    cfg = AlignConfig(num_train_epochs=0, sft_max_steps=1, **SMALL_ALIGN)
    assert cfg.sft_loss == "listwise" and cfg.negatives_loaded > 3
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rerank = [u for u in pairs_uris if u.endswith("rerank.parquet")]
    examples = encode_pairs(tokenizer, load_pairs(rerank, cfg.negatives_loaded), cfg)
    model = build_policy(str(tiny_llama_dir), cfg, torch.device("cpu"))
    model.eval()
    batch = collate(examples[:3], tokenizer.pad_token_id)
    with torch.no_grad():
        losses, top1 = listwise_loss(PolicyScorer(model)(**batch.tensors()), batch.present())
        letters = letter_token_ids(tokenizer, 20)
        for b, example in enumerate(examples[:3]):
            logits = model(input_ids=torch.tensor([example.prompt_ids])).logits[0, -1]
            ids = [c[0] for c in example.completion_ids]
            assert set(ids) <= set(letters)
            expected = torch.logsumexp(logits[ids], 0) - logits[ids[0]]
            assert losses[b].item() == pytest.approx(expected.item(), abs=1e-4)
            assert bool(top1[b]) == bool((logits[ids[1:]] < logits[ids[0]]).all())
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -2.0, -0.5]])
    present = torch.tensor([[True, True, True], [True, True, False]])
    losses, top1 = listwise_loss(logps, present)
    assert losses[1].item() == pytest.approx(np.log(1 + np.exp(-1.0)), abs=1e-6)
    assert top1.tolist() == [False, True]


def test_listwise_sft_steps_learn_the_chosen_letters(pairs_uris, tiny_llama_dir):
    from transformers import AutoTokenizer

    cfg = AlignConfig(num_train_epochs=0, sft_max_steps=1, per_device_train_batch_size=6, **SMALL_ALIGN)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rerank = [u for u in pairs_uris if u.endswith("rerank.parquet")]
    examples = encode_pairs(tokenizer, load_pairs(rerank, cfg.negatives_loaded), cfg)
    model = build_policy(str(tiny_llama_dir), cfg, torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    rows = [np.arange(len(examples))]
    losses = [train_step(PolicyScorer(model), model, optimizer, examples, rows, cfg, tokenizer.pad_token_id,
                         torch.device("cpu"), "sft", None, trainable) for _ in range(12)]
    n = len(examples)
    assert losses[-1]["loss_sum"] / n < 0.7 * losses[0]["loss_sum"] / n
    assert losses[-1]["top1_sum"] == n
