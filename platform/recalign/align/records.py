"""The step records of `recalign.align.loop`: every worker's metric sums reduced to one global record per
optimizer step, and that record as TensorBoard and MLflow scalars."""

from __future__ import annotations

import os

import torch

SFT, PREFERENCE = "sft", "preference"


def global_record(sums: dict[str, float], seconds: float, phase: str, step: int, lr: float, device) -> dict:
    """Metric sums of all workers -> the step's global means (identical on every worker)."""
    import torch.distributed as dist

    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys] + [seconds], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        seconds_max = values[-1:].clone()
        dist.all_reduce(values)
        dist.all_reduce(seconds_max, op=dist.ReduceOp.MAX)
        values[-1] = seconds_max[0]
    total = dict(zip(keys + ["seconds"], values.cpu().tolist()))
    n = max(total["examples"], 1.0)
    record = {"phase": phase, "step": step, "lr": lr, "loss": total["loss_sum"] / n,
              "step_seconds": total["seconds"], "tokens_per_s": total["sequence_tokens"] / total["seconds"]}
    if "top1_sum" in total:
        record["top1_accuracy"] = total["top1_sum"] / n
    if phase == PREFERENCE:
        record.update(reward_accuracy=total["accuracy_sum"] / n, reward_accuracy_all=total["accuracy_all_sum"] / n,
                      rewards_chosen=total["chosen_sum"] / n, rewards_rejected=total["rejected_sum"] / n,
                      reward_margin=total["margin_sum"] / n)
    return record


def scalars(record: dict) -> dict[str, float]:
    """A step record as the scalars TensorBoard and MLflow show: train/loss, sft/loss, train/reward_margin, ..."""
    prefix = "sft" if record["phase"] == SFT else "train"
    return {f"{prefix}/{key}": value for key, value in record.items() if key not in ("phase", "step")}


def log_scalars(writer, record: dict) -> None:
    for tag, value in scalars(record).items():
        writer.add_scalar(tag, value, record["step"])


def summary_writer(tb_dir: str, step: int):
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(tb_dir, exist_ok=True)
    # Records are logged at step = steps done (1, 2, ...); purge_step drops what a crashed attempt logged
    # after the checkpoint we resume from, so TensorBoard shows each step once.
    return SummaryWriter(tb_dir, purge_step=step + 1 if step > 0 else None, flush_secs=10)


def add_sums(sums: dict[str, float], **values: float) -> None:
    for key, value in values.items():
        sums[key] = sums.get(key, 0.0) + float(value)
