"""SASRec under Ray Train: DDP over N workers, a checkpoint every epoch, resume, early stopping.

The per-worker loop (`train_loop`) runs inside `TorchTrainer`; `fit_sasrec` is the driver that
builds the trainer and copies the best model out of the final checkpoint into the run dir.

Why the pieces are shaped this way:
- Validation is sharded across workers and all-reduced, so every worker sees the same NDCG@10 and
  takes the same early-stopping decision without broadcasting it.
- Every checkpoint carries the best-so-far weights, so whichever checkpoint a restarted worker group
  resumes from, the best model is never lost.
- After each epoch the workers all-gather a checksum of their parameters and fail loudly if they
  diverged (gradients not synchronised), instead of training silently unsynchronised.
"""

from __future__ import annotations

import io as _io
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from recalign import io, metrics
from recalign.recsys.sasrec import SASRec, SASRecConfig, next_item_loss


@dataclass
class SeqTrainConfig:
    epochs: int = 100  # upper bound; early stopping usually ends sooner
    batch_size: int = 128  # per worker
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    eval_batch_size: int = 512
    seed: int = 0
    num_workers: int = 2  # Ray Train workers (DDP); 0 = run in the driver process (tests)
    use_gpu: bool = False  # NCCL on GPU, gloo on CPU
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker-group restarts from the last checkpoint before giving up
    checkpoints_to_keep: int = 2


@dataclass
class SASRecJobSpec:
    """What one SASRec fit needs; passed to every worker."""

    data_dir: str
    model: SASRecConfig = field(default_factory=SASRecConfig)
    train: SeqTrainConfig = field(default_factory=SeqTrainConfig)


def make_windows(sequences: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each train sequence into next-item windows, newest first, left-padded with 0.

    Returns inputs, targets: (N, max_len) with targets[:, t] = the item after inputs[:, t].
    """
    inputs, targets = [], []
    for seq in sequences:
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            chunk = seq[start:end]
            row_in = np.zeros(max_len, dtype=np.int64)
            row_out = np.zeros(max_len, dtype=np.int64)
            row_in[max_len - len(chunk) + 1:] = chunk[:-1]
            row_out[max_len - len(chunk) + 1:] = chunk[1:]
            inputs.append(row_in)
            targets.append(row_out)
            end = start + 1  # the next window ends where this one's first input was
            if start == 0:
                break
    return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets))


@torch.no_grad()
def score_split(model: SASRec, history: np.ndarray, candidates: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(B, C) scores of each row's candidates given its history."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(history), batch_size):
        h = torch.as_tensor(history[start:start + batch_size], device=device)
        c = torch.as_tensor(candidates[start:start + batch_size], device=device)
        out.append(model(h, c).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, candidates.shape[1]), dtype=np.float32)


def sharded_mean(values: np.ndarray) -> float:
    """Mean of per-example values that each worker computed on its own shard (all-reduced)."""
    import torch.distributed as dist

    total = torch.tensor([float(np.sum(values)), float(len(values))], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        total = total.to(_collective_device())
        dist.all_reduce(total)
        total = total.cpu()
    return float(total[0] / max(total[1].item(), 1.0))


def param_divergence(model: torch.nn.Module) -> float:
    """Max difference across workers of a parameter checksum (0.0 when synchronised)."""
    import torch.distributed as dist

    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0
    gathered = [torch.zeros_like(checksum, device=_collective_device()) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum.to(_collective_device()))
    values = torch.cat(gathered).cpu()
    return float(values.max() - values.min())


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def restore_state(checkpoint, core: torch.nn.Module, optimizer) -> dict[str, Any]:
    """The early-stopping state of a sequential recommender's loop: fresh, or the checkpoint's, whose
    weights and optimizer state are loaded into `core` and `optimizer`."""
    if not checkpoint:
        return {"epoch": 0, "best_ndcg": -1.0, "best_epoch": -1, "bad_epochs": 0, "best_model": None}
    with checkpoint.as_directory() as ckpt_dir:
        saved = torch.load(os.path.join(ckpt_dir, "state.pt"), map_location="cpu", weights_only=False)
    core.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return saved["state"]


def end_epoch(state: dict[str, Any], epoch: int, valid_ndcg: float, core: torch.nn.Module) -> None:
    """Record a finished epoch: keep a copy of the weights if validation NDCG@10 improved, else count it
    towards patience. Every checkpoint carries the best weights, so no restart can lose them."""
    state["epoch"] = epoch + 1
    if valid_ndcg > state["best_ndcg"]:
        state.update(best_ndcg=valid_ndcg, best_epoch=epoch, bad_epochs=0,
                     best_model={k: v.detach().cpu().clone() for k, v in core.state_dict().items()})
    else:
        state["bad_epochs"] += 1


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop. config: {"spec": SASRecJobSpec, "on_epoch_end": optional callable}."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from recalign.data.dataset import Dataset

    spec: SASRecJobSpec = config["spec"]
    on_epoch_end: Callable[[int], None] | None = config.get("on_epoch_end")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(spec.train.seed)

    data = Dataset(spec.data_dir)
    inputs, targets = make_windows(data.train_sequences(), spec.model.max_len)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=spec.train.batch_size, shuffle=True)
    loader = ray.train.torch.prepare_data_loader(loader)
    valid = data.split("valid")
    shard = np.arange(rank, len(valid), world)  # each worker validates its own rows

    model = ray.train.torch.prepare_model(SASRec(data.num_items, spec.model))
    core = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)

    state = restore_state(ray.train.get_checkpoint(), core, optimizer)
    resumed_from = state["epoch"]

    for epoch in range(state["epoch"], spec.train.epochs):
        if state["bad_epochs"] >= spec.train.patience:
            break
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        model.train()
        losses = []
        for batch_in, batch_out in loader:
            loss = next_item_loss(model(batch_in), core.item_emb.weight, batch_out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

        scores = score_split(core, valid.history[shard], valid.candidates[shard], spec.train.eval_batch_size)
        ndcg10 = sharded_mean(metrics.ndcg_at_k(scores, valid.target_index[shard], 10).numpy())
        hr10 = sharded_mean(metrics.hr_at_k(scores, valid.target_index[shard], 10).numpy())
        divergence = param_divergence(core)
        if divergence > 1e-6 * max(1.0, sum(p.numel() for p in core.parameters()) ** 0.5):
            raise RuntimeError(f"worker parameters diverged (checksum spread {divergence:.3g}): "
                               "gradients are not synchronised across workers")
        end_epoch(state, epoch, ndcg10, core)
        report = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                  "valid_ndcg@10": ndcg10, "valid_hr@10": hr10, "best_valid_ndcg@10": state["best_ndcg"],
                  "best_epoch": state["best_epoch"], "resumed_from_epoch": resumed_from,
                  "param_divergence": divergence, "world_size": world}
        _report(report, core, optimizer, state, rank)
        if on_epoch_end is not None:
            on_epoch_end(epoch)


def _report(report: dict, core: SASRec, optimizer, state: dict, rank: int) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(report, checkpoint=None)
        return
    # Ray uploads the directory to run storage and then deletes it. In local mode (num_workers=0,
    # tests) nothing is uploaded, so the directory must outlive this call and stays in the temp dir.
    ckpt_dir = tempfile.mkdtemp(prefix="sasrec-ckpt-")
    torch.save({"model": core.state_dict(), "optimizer": optimizer.state_dict(), "state": state},
               os.path.join(ckpt_dir, "state.pt"))
    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir),
                     delete_local_checkpoint_after_upload=True)


def fit_sasrec(spec: SASRecJobSpec, out_dir: str, storage_path: str, run_name: str,
               on_epoch_end: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train SASRec under a TorchTrainer and write `out_dir/model.pt` + `out_dir/config.json`.

    `run_name` + `storage_path` identify the Ray Train run: re-running with the same pair resumes
    from its last checkpoint, so callers put a config fingerprint in the name.
    Returns the final report (validation metrics, best epoch, ...).
    """
    best, final = run_trainer(train_loop, {"spec": spec, "on_epoch_end": on_epoch_end}, spec.train, storage_path,
                              run_name, "SASRec")
    save_model(best, spec, out_dir, final)
    return final


def run_trainer(loop: Callable[[dict], None], loop_config: dict[str, Any], cfg: SeqTrainConfig, storage_path: str,
                run_name: str, what: str) -> tuple[dict, dict[str, Any]]:
    """Fit a sequential recommender's per-worker `loop` under a TorchTrainer (DDP, a checkpoint per epoch,
    worker-group restarts); returns (best weights, final report) from the last checkpoint's state.pt."""
    from recalign.distributed import fit_torch_trainer

    result = fit_torch_trainer(loop, loop_config, cfg, storage_path, run_name, f"{what} training")
    with result.checkpoint.as_directory() as ckpt_dir:
        saved = torch.load(os.path.join(ckpt_dir, "state.pt"), map_location="cpu", weights_only=False)
    state = saved["state"]
    best = state["best_model"] if state["best_model"] is not None else saved["model"]
    final = dict(result.metrics or {})
    final.update(best_epoch=state["best_epoch"], best_valid_ndcg=state["best_ndcg"], epochs_run=state["epoch"])
    return best, final


def save_model(state_dict: dict, spec: SASRecJobSpec, out_dir: str, report: dict) -> None:
    """Atomically write model.pt (weights + config) and config.json (spec + final report)."""
    buffer = _io.BytesIO()
    torch.save({"state_dict": state_dict, "model": asdict(spec.model), "num_items": _num_items(state_dict)}, buffer)
    io.write_bytes(buffer.getvalue(), io.join(out_dir, "model.pt"))
    io.write_json({"spec": asdict(spec), "report": report}, io.join(out_dir, "config.json"))


def load_model(out_dir: str) -> SASRec:
    """The SASRec saved by `fit_sasrec`, in eval mode on CPU."""
    blob = torch.load(_io.BytesIO(io.read_bytes(io.join(out_dir, "model.pt"))), map_location="cpu",
                      weights_only=False)
    model = SASRec(blob["num_items"], SASRecConfig(**blob["model"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def _num_items(state_dict: dict) -> int:
    return int(state_dict["item_emb.weight"].shape[0] - 1)
