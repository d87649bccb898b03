"""SASRec under Ray Train: gradients synchronise across 2 workers; a killed worker resumes."""

import json
import os
import time

import numpy as np
import pytest
import torch

from recalign.recsys.sasrec import SASRec, SASRecConfig, next_item_loss
from recalign.recsys.train import SASRecJobSpec, SeqTrainConfig, fit_sasrec, load_model, make_windows, score_split

pytestmark = pytest.mark.ray


def test_make_windows_cover_every_transition():
    seq = np.arange(1, 9)  # 8 items -> 7 next-item transitions
    inputs, targets = make_windows([seq], max_len=3)
    pairs = {(int(i), int(t)) for row_in, row_out in zip(inputs, targets) for i, t in zip(row_in, row_out) if t}
    assert pairs == {(k, k + 1) for k in range(1, 8)}
    assert inputs.shape[1] == 3 and (targets[inputs == 0] == 0).all()


def _grad_sync_loop(config):
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    # No dropout: the local and the synchronised pass must see the same function.
    model = ray.train.torch.prepare_model(SASRec(50, SASRecConfig(hidden_size=16, num_heads=2, max_len=6, dropout=0.0)))
    core = model.module
    gen = torch.Generator().manual_seed(100 + rank)  # each worker sees different data
    inputs = torch.randint(1, 51, (8, 6), generator=gen)
    targets = torch.randint(1, 51, (8, 6), generator=gen)
    with model.no_sync():  # local gradient only
        next_item_loss(model(inputs), core.item_emb.weight, targets).backward()
    local = torch.cat([p.grad.flatten() for p in core.parameters()]).clone()
    model.zero_grad()
    next_item_loss(model(inputs), core.item_emb.weight, targets).backward()  # synchronised
    synced = torch.cat([p.grad.flatten() for p in core.parameters()])
    gathered = [torch.zeros_like(local) for _ in range(2)]
    dist.all_gather(gathered, local)
    np.save(os.path.join(config["out"], f"rank{rank}.npy"),
            torch.stack([gathered[0], gathered[1], synced]).numpy())
    ray.train.report({"rank": rank})


def test_gradients_synchronise_across_two_workers(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(_grad_sync_loop, train_loop_config={"out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(name="gradsync", storage_path=str(tmp_path / "ray"))).fit()
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    local0, local1, synced0 = r0
    synced1 = r1[2]
    assert not np.allclose(local0, local1), "workers must see different data"
    np.testing.assert_allclose(synced0, (local0 + local1) / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(synced0, synced1, rtol=1e-6, atol=1e-8)


def _kill_rank1_once(marker):
    def on_epoch_end(epoch):
        import ray.train

        if epoch == 1 and ray.train.get_context().get_world_rank() == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            # Ray Train's controller registers a checkpoint when it polls the workers' reports; on a
            # loaded machine a death within a second or two of epoch 0's report can pre-empt that,
            # and training then rightly restarts from scratch. Die later, as real failures mostly do.
            time.sleep(5)
            os._exit(1)  # a hard worker death, not a Python exception

    return on_epoch_end


def test_fit_two_workers_resumes_after_killed_worker(ray_local, ml100k_dir, tmp_path):
    marker = str(tmp_path / "killed")
    spec = SASRecJobSpec(ml100k_dir, SASRecConfig(hidden_size=16, num_heads=2, max_len=10),
                         SeqTrainConfig(epochs=3, train_batch_size=256, patience=5, num_workers=2, max_failures=2))
    out_dir = str(tmp_path / "sasrec")
    report = fit_sasrec(spec, out_dir, str(tmp_path / "ray"), "sasrec-test", on_epoch_end=_kill_rank1_once(marker))
    assert os.path.exists(marker), "the worker was killed"
    assert report["world_size"] == 2 and report["param_divergence"] == 0.0
    assert report["resumed_from_epoch"] >= 1, "restarted from a checkpoint, not from scratch"
    assert report["epochs_run"] == 3 and report["epoch"] == 2
    assert report["best_valid_ndcg"] > 0.3  # random is 0.227
    model = load_model(out_dir)
    saved = json.load(open(os.path.join(out_dir, "config.json")))
    assert saved["report"]["best_epoch"] == report["best_epoch"]
    scores = score_split(model, np.array([[0] * 8 + [1, 2]]), np.array([[3, 4, 5]]))
    assert scores.shape == (1, 3) and np.isfinite(scores).all()
