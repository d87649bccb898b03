"""Ray Train plumbing: fitting a per-worker loop, its failures named, and the collectives loops use."""

import os
import tempfile

import numpy as np
import pytest
import torch

from recalign.distributed import check_in_sync, fit_torch_trainer, sharded_mean

pytestmark = pytest.mark.ray

FIT = dict(use_gpu=False, cpus_per_worker=1.0, max_failures=0, num_to_keep=1)


def _reporting_loop(config):
    """Reports one metric and, when asked, a checkpoint holding a file."""
    import ray.train

    ctx = ray.train.get_context()
    metrics = {"rank": ctx.get_world_rank(), "world": ctx.get_world_size(),
               "mean": sharded_mean(np.array([float(ctx.get_world_rank())] * 3))}
    if not config["checkpoint"] or ctx.get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    folder = config.get("local_dir") or tempfile.mkdtemp()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "value.txt"), "w") as out:
        out.write("42")
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _failing_loop(config):
    raise ValueError("bad input row 7")


def _desync_loop(config):
    """Each worker perturbs its own copy of the weights: the sync check must raise."""
    import ray.train

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    with torch.no_grad():
        model.weight.add_(0.01 * (ray.train.get_context().get_world_rank() + 1))
    check_in_sync(model, "after the perturbation")
    ray.train.report({"ok": 1}, checkpoint=None)


def test_fit_returns_the_result_with_its_checkpoint(ray_local, tmp_path):
    result = fit_torch_trainer(_reporting_loop, {"checkpoint": True}, num_workers=2, storage_path=str(tmp_path),
                               run_name="fit-ok", what="the toy loop", **FIT)
    assert result.metrics["world"] == 2 and result.metrics["mean"] == pytest.approx(0.5), "mean over both shards"
    with result.checkpoint.as_directory() as folder:
        assert open(os.path.join(folder, "value.txt")).read() == "42"


def test_a_failed_loop_and_a_missing_checkpoint_are_named(ray_local, tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)the toy loop failed: .*bad input row 7"):
        fit_torch_trainer(_failing_loop, {}, num_workers=1, storage_path=str(tmp_path), run_name="fit-fail",
                          what="the toy loop", **FIT)
    with pytest.raises(RuntimeError, match="the toy loop reported no checkpoint"):
        fit_torch_trainer(_reporting_loop, {"checkpoint": False}, num_workers=1, storage_path=str(tmp_path),
                          run_name="fit-nockpt", what="the toy loop", **FIT)


def test_workers_out_of_sync_fail_loudly(ray_local, tmp_path):
    with pytest.raises(RuntimeError, match="worker weights diverged after the perturbation"):
        fit_torch_trainer(_desync_loop, {}, num_workers=2, storage_path=str(tmp_path), run_name="fit-desync",
                          what="the toy loop", **FIT)


def test_outside_a_worker_group_the_collectives_are_local():
    model = torch.nn.Linear(4, 2)
    assert check_in_sync(model, "here") == 0.0
    assert sharded_mean(np.array([1.0, 2.0, 6.0])) == 3.0
    assert sharded_mean(np.array([])) == 0.0
