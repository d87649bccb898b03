"""One way to run a per-worker training loop under Ray Train, shared by every trainer of the project."""

from __future__ import annotations

from typing import Any, Callable


def fit_torch_trainer(loop: Callable[[dict], None], loop_config: dict[str, Any], cfg, storage_path: str,
                      run_name: str, what: str):
    """Fit `loop` under a TorchTrainer and return the ray.train.Result; a failed run or one without a
    checkpoint raises, naming `what`.

    `cfg` supplies num_workers (0 = in the driver), use_gpu (one GPU per worker, NCCL; else gloo and
    cpus_per_worker CPUs), max_failures (worker-group restarts from the last checkpoint) and
    checkpoints_to_keep. `storage_path` + `run_name` name the run: fitting the same pair again resumes it.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=None if cfg.use_gpu else {"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep)),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{what} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{what} reported no checkpoint")
    return result
