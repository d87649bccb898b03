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
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch

from recalign import io, metrics
from recalign.config import option
from recalign.distributed import check_in_sync, seed_everything, sharded_mean
from recalign.recsys.sasrec import SASRec, SASRecConfig, next_item_loss


@dataclass
class SeqTrainConfig:
    """Training of a sequential recommender (SASRec, KA-SASRec); names follow RecBole where they mean the same."""

    RENAMED: ClassVar[dict[str, str]] = {"lr": "learning_rate", "batch_size": "train_batch_size"}

    epochs: int = option(100, "upper bound; early stopping usually ends sooner")
    train_batch_size: int = option(128, "next-item windows per worker batch")
    learning_rate: float = option(1e-3, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    patience: int = option(10, "epochs without a better validation NDCG@10 before stopping")
    eval_batch_size: int = option(512, "validation rows per forward pass")
    seed: int = option(0, "weight init, data order and knowledge draws")
    num_workers: int = option(2, "Ray Train workers (DDP); 0 = run in the driver process (tests)")
    use_gpu: bool = option(False, "one GPU per worker, NCCL; else gloo on CPU")
    cpus_per_worker: float = option(1.0, "CPU workers' Ray resources")
    max_failures: int = option(2, "worker-group restarts from the last checkpoint before giving up")
    checkpoints_to_keep: int = option(2, "checkpoints kept in the run storage")


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


def prepare_training(model: torch.nn.Module, cfg: SeqTrainConfig):
    """(model, core, optimizer, state) on a Ray Train worker: the model wrapped for DDP, its core (the
    unwrapped module), AdamW, and the early-stopping state restored from the run's last checkpoint."""
    import ray.train
    import ray.train.torch

    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return model, core, optimizer, restore_state(ray.train.get_checkpoint(), core, optimizer)


def epochs_left(state: dict[str, Any], cfg: SeqTrainConfig, loader) -> Iterator[int]:
    """The epochs still to run: from where the state stopped until cfg.epochs, or until `patience` epochs
    without a better validation NDCG@10. A distributed sampler is reshuffled for each."""
    from torch.utils.data import DistributedSampler

    for epoch in range(state["epoch"], cfg.epochs):
        if state["bad_epochs"] >= cfg.patience:
            return
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        yield epoch


def finish_epoch(report: dict[str, Any], state: dict[str, Any], epoch: int, core: torch.nn.Module, optimizer,
                 rank: int, local_dir: str | None) -> None:
    """After an epoch's validation (report["valid_ndcg@10"]): check that the workers are in sync, record the
    epoch in the state, and report it to Ray Train with a checkpoint."""
    report["param_divergence"] = check_in_sync(core, f"after epoch {epoch}")
    end_epoch(state, epoch, report["valid_ndcg@10"], core)
    report.update(epoch=epoch, best_valid_ndcg=state["best_ndcg"], best_epoch=state["best_epoch"])
    report_checkpoint(report, core, optimizer, state, rank, local_dir)


def report_checkpoint(report: dict, core: torch.nn.Module, optimizer, state: dict, rank: int,
                      local_dir: str | None) -> None:
    """Rank 0 alone writes the checkpoint (DDP keeps the weights identical); the others only report.

    Ray Train copies a reported checkpoint into its storage, except in local mode (num_workers=0),
    which keeps a reference to the folder: there it goes to `local_dir`, not a temp dir that vanishes.
    """
    import ray.train

    if rank != 0:
        ray.train.report(report, checkpoint=None)
        return
    blob = {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "state": state}
    if local_dir is not None:
        folder = os.path.join(local_dir, f"epoch-{state['epoch']:04d}")
        os.makedirs(folder, exist_ok=True)
        torch.save(blob, os.path.join(folder, "state.pt"))
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(blob, os.path.join(tmp, "state.pt"))
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop. config: {"spec": SASRecJobSpec, "on_epoch_end"?, "local_checkpoint_dir"?}."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, TensorDataset

    from recalign.data.dataset import Dataset

    spec: SASRecJobSpec = config["spec"]
    on_epoch_end: Callable[[int], None] | None = config.get("on_epoch_end")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(spec.train.seed)

    data = Dataset(spec.data_dir)
    inputs, targets = make_windows(data.train_sequences(), spec.model.max_len)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=spec.train.train_batch_size, shuffle=True)
    loader = ray.train.torch.prepare_data_loader(loader)
    valid = data.split("valid")
    shard = np.arange(rank, len(valid), world)  # each worker validates its own rows
    model, core, optimizer, state = prepare_training(SASRec(data.num_items, spec.model), spec.train)
    resumed_from = state["epoch"]

    for epoch in epochs_left(state, spec.train, loader):
        model.train()
        losses = []
        for batch_in, batch_out in loader:
            loss = next_item_loss(model(batch_in), core.item_emb.weight, batch_out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

        scores = score_split(core, valid.history[shard], valid.candidates[shard], spec.train.eval_batch_size)
        report = {"train_loss": float(np.mean(losses)) if losses else float("nan"),
                  "valid_ndcg@10": sharded_mean(metrics.ndcg_at_k(scores, valid.target_index[shard], 10).numpy()),
                  "valid_hr@10": sharded_mean(metrics.hr_at_k(scores, valid.target_index[shard], 10).numpy()),
                  "resumed_from_epoch": resumed_from, "world_size": world}
        finish_epoch(report, state, epoch, core, optimizer, rank, config.get("local_checkpoint_dir"))
        if on_epoch_end is not None:
            on_epoch_end(epoch)


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
    worker-group restarts); returns (best weights, final report) from the last checkpoint's state.pt.

    In local mode (num_workers=0) the loop's checkpoints go to a folder under the run's storage (see
    `report_checkpoint`)."""
    from recalign.distributed import fit_torch_trainer

    local_dir = os.path.join(io.local_path(storage_path), run_name, "local") if cfg.num_workers == 0 else None
    result = fit_torch_trainer(loop, {**loop_config, "local_checkpoint_dir": local_dir}, num_workers=cfg.num_workers,
                               use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures,
                               num_to_keep=cfg.checkpoints_to_keep, storage_path=storage_path, run_name=run_name,
                               what=f"{what} training")
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
