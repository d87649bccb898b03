"""Ray Train plumbing shared by every trainer of the project: one way to fit a per-worker loop under a
TorchTrainer, and the collectives those loops need (sharded means, a parameter-sync check)."""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import torch


def fit_torch_trainer(loop: Callable[[dict], None], loop_config: dict[str, Any], *, num_workers: int, use_gpu: bool,
                      cpus_per_worker: float, max_failures: int, num_to_keep: int, storage_path: str, run_name: str,
                      what: str):
    """Fit `loop` under a TorchTrainer and return the ray.train.Result; a failed run or one without a
    checkpoint raises, naming `what`.

    num_workers 0 runs the loop in the driver (tests); use_gpu gives one GPU per worker (NCCL), else gloo
    with cpus_per_worker CPUs each; max_failures worker-group restarts from the last checkpoint;
    num_to_keep checkpoints kept. `storage_path` + `run_name` name the run: fitting the same pair again
    resumes it.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:  # a worker's exception, or the controller's: name the run
        raise RuntimeError(f"{what} failed: {err}") from err
    if result.error:
        raise RuntimeError(f"{what} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{what} reported no checkpoint")
    return result


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """Where tensors must live for a collective: the worker's GPU under NCCL, else the CPU (gloo)."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sharded_mean(values: np.ndarray) -> float:
    """Mean of per-example values that each worker computed on its own shard (all-reduced)."""
    import torch.distributed as dist

    total = torch.tensor([float(np.sum(values)), float(len(values))], dtype=torch.float64)
    if _initialized():
        total = total.to(collective_device())
        dist.all_reduce(total)
        total = total.cpu()
    return float(total[0] / max(total[1].item(), 1.0))


def check_in_sync(model: torch.nn.Module, where: str) -> float:
    """Spread across workers of a float64 checksum of the trainable weights; raises if they diverged.

    Workers whose gradients are all-reduced hold bit-identical weights, so the spread is exactly 0. One
    optimizer step without the sync moves the checksum by about lr * sqrt(n) (n weights, updates of
    random sign), orders of magnitude above the tolerance of 1e-6 * sqrt(n), which only absorbs
    summation-order noise. Returns the spread (0.0 outside a worker group).
    """
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    if not _initialized():
        return 0.0
    device = collective_device()
    gathered = [torch.zeros_like(checksum, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum.to(device))
    values = torch.cat(gathered).cpu()
    spread = float(values.max() - values.min())
    tolerance = 1e-6 * max(1.0, sum(p.numel() for p in params) ** 0.5)
    if spread > tolerance:
        raise RuntimeError(f"worker weights diverged {where} (checksum spread {spread:.3g} > {tolerance:.3g}): "
                           "gradients are not synchronised across workers")
    return spread
