"""Alignment under Ray Train with 2 workers: DDP gradient sync, a killed worker resumes, the published
adapter loads and merges, TensorBoard has the scalars, and MLflow has one run across the restart."""

import json
import os

import numpy as np
import pytest
import torch

from recalign.align.config import AlignConfig
from recalign.align.trainer import CrashOnce, train_policy
from recalign.tracking import MlflowTarget
from tests.helpers.align import TWO_WORKERS

pytestmark = pytest.mark.ray

TAGS = ["train/loss", "train/reward_accuracy", "train/rewards_chosen", "train/rewards_rejected", "train/reward_margin",
        "train/tokens_per_s", "sft/loss"]


def _grad_sync_loop(config):
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from recalign.align.logprobs import PolicyScorer, collate
    from recalign.align.loop import build_policy, encode_pairs, reference_logps
    from recalign.align.losses import preference_loss
    from recalign.pairs.read import load_pairs

    rank = ray.train.get_context().get_world_rank()
    cfg: AlignConfig = config["cfg"]
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    examples = encode_pairs(tokenizer, load_pairs(config["pairs"], cfg.num_negatives), cfg)
    model = build_policy(config["model"], cfg, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init would make the gradient of A zero everywhere
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=generator)
    scorer = ray.train.torch.prepare_model(PolicyScorer(model),
                                           parallel_strategy_kwargs={"find_unused_parameters": False})
    batch = collate(examples[2 * rank:2 * rank + 2], tokenizer.pad_token_id)  # each worker its own shard
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of_shard():
        policy = scorer(**batch.tensors())
        reference = reference_logps(model, batch)
        return preference_loss(policy[:, 0], policy[:, 1:], reference[:, 0], reference[:, 1:], cfg.beta,
                               cfg.loss_type)[0].mean()

    with scorer.no_sync():  # this worker's own gradient
        loss_of_shard().backward()
    local = torch.cat([p.grad.flatten() for p in params]).clone()
    scorer.zero_grad()
    loss_of_shard().backward()  # DDP all-reduces (averages) the gradients
    synced = torch.cat([p.grad.flatten() for p in params])
    torch.optim.SGD(params, lr=0.1).step()
    weights = torch.cat([p.detach().flatten() for p in params])
    gathered = {name: [torch.zeros_like(t) for _ in range(2)] for name, t in
                (("local", local), ("synced", synced), ("weights", weights))}
    for name, tensor in (("local", local), ("synced", synced), ("weights", weights)):
        dist.all_gather(gathered[name], tensor)
    np.save(os.path.join(config["out"], f"rank{rank}.npy"),
            np.stack([t.numpy() for name in ("local", "synced", "weights") for t in gathered[name]]))
    ray.train.report({"rank": rank})


def test_ddp_gradients_synchronise_across_workers(ray_local, tiny_llama_dir, pairs_uris, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = AlignConfig(loss_type="sdpo", num_negatives=3, **TWO_WORKERS)
    TorchTrainer(_grad_sync_loop, train_loop_config={"cfg": cfg, "model": str(tiny_llama_dir), "pairs": pairs_uris,
                                                     "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="align-grad-sync", storage_path=str(tmp_path / "ray"))).fit()
    local0, local1, synced0, synced1, weights0, weights1 = np.load(tmp_path / "rank0.npy")
    assert np.abs(local0 - local1).max() > 1e-4, "different shards give different local gradients"
    np.testing.assert_allclose(synced0, synced1, rtol=0, atol=1e-7)
    np.testing.assert_allclose(synced0, (local0 + local1) / 2, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(weights0, weights1)


def test_two_workers_resume_after_a_killed_worker_and_publish_a_peft_adapter(ray_local, tiny_llama_dir, pairs_uris,
                                                                             tmp_path):
    from recalign.tracking import connect
    from peft import PeftModel
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    from recalign.align.loop import build_policy

    # 1 SFT step, then 4 preference steps; checkpoints after steps 1, 2, 4, 5; worker 1 dies after step 3.
    cfg = AlignConfig(loss_type="sdpo", num_negatives=3, sft_max_steps=1, max_steps=4, max_failures=1, **TWO_WORKERS)
    out_dir = str(tmp_path / "runs" / "t" / "policy" / "sdpo")
    marker = str(tmp_path / "killed")
    tracking = MlflowTarget(f"file:{tmp_path}/mlflow", "t")
    summary = train_policy(cfg, str(tiny_llama_dir), pairs_uris, out_dir, str(tmp_path / "ray"), "align-resume",
                           hooks=[CrashOnce(marker, step=3, rank=1, delay_s=3.0)], tracking=tracking)

    assert os.path.exists(marker), "the worker was killed"
    # Ray registers a checkpoint when its controller next polls the workers (every 2 s); the delay lets it see
    # step 2's, but under heavy load it may still resume from step 1's. Either way: a checkpoint, not step 0.
    assert summary["starts"][0] == 0 and summary["starts"][1] in (1, 2) and len(summary["starts"]) == 2
    assert summary["steps"] == 5 and summary["sft_steps"] == 1 and summary["world_size"] == 2
    history = summary["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["phase"] for h in history] == ["sft"] + ["preference"] * 4
    assert all(np.isfinite(h["loss"]) and h["tokens_per_s"] > 0 for h in history)
    assert sorted(os.listdir(out_dir)) == ["adapter_config.json", "adapter_model.safetensors", "metrics.json",
                                           "tensorboard"]
    assert json.load(open(os.path.join(out_dir, "metrics.json")))["starts"] == summary["starts"]

    # every LoRA tensor moved away from its (seeded) initial value
    initial = build_policy(str(tiny_llama_dir), cfg, torch.device("cpu"))
    init_lora = {n: p for n, p in initial.named_parameters() if p.requires_grad}
    trained = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
    assert len(trained) == len(init_lora) > 0
    for name, tensor in trained.items():
        start = init_lora[name.replace(".weight", ".default.weight")]
        assert not torch.allclose(tensor, start.detach()), f"{name} did not change"

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    policy = PeftModel.from_pretrained(base, out_dir).eval()
    ids = torch.tensor([[1, 288, 259, 201, 479, 326, 486, 2, 201, 1, 299]])
    with torch.no_grad():
        adapted = policy(input_ids=ids).logits
        merged = policy.merge_and_unload()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert (adapted - plain).abs().max() > 1e-4, "the adapter changes the model"

    events = EventAccumulator(os.path.join(out_dir, "tensorboard"))
    events.Reload()
    assert set(TAGS) <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 3, 4, 5], "the crashed attempt's step 3 is purged"
    assert [e.step for e in events.Scalars("sft/loss")] == [1]

    # One MLflow run across the restart, each step logged once as in TensorBoard: rank 0 logs at checkpoints, so
    # the crashed attempt's step 3 is not there. (Resumed from step 1's checkpoint, step 2 is there twice: the
    # crashed attempt had logged it at its own step-2 checkpoint.)
    client = connect(tracking.tracking_uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "align-resume"
    assert logged.data.params["num_negatives"] == "3" and logged.data.params["sft_max_steps"] == "1"
    steps = sorted(m.step for m in client.get_metric_history(logged.info.run_id, "train/loss"))
    assert steps == ([2, 3, 4, 5] if summary["starts"][1] == 2 else [2, 2, 3, 4, 5])
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "sft/loss")] == [1]
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(logged.info.run_id, "adapter")}
