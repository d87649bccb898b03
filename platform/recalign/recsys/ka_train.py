"""Knowledge-augmented SASRec under Ray Train: the reward model of RLRF4Rec.

Same machinery as `recalign.recsys.train` (DDP, sharded validation, parameter-divergence check, a
checkpoint with the best-so-far weights every epoch, resume, early stopping), with knowledge:

- Training data = each user's train sequence minus its last item. That item is the `train`
  example's target, on which the rewards are computed, so a reward is always an out-of-sample
  prediction. Validation and test targets are not in train sequences at all.
- Knowledge is fused only where it is known. An analysis written from the history that ends before
  position p describes the items before p, so it may only inform predictions of items at p or later.
  Training reads the `cutoff` analyses (written at the cutoff example, `knowledge_horizon` items
  before the train target) at the positions predicting those horizon items, and nowhere else: a
  position whose target the analysis's prompt listed never sees it. The rewarded `train` analyses
  are written one item before the train target, so training never reads them at all.
- Every epoch each user is fed one of their cutoff analyses, drawn at random (same draw on every
  worker). A share `knowledge_dropout` of windows gets no knowledge, which keeps the no-text path working.
- Validation (early stopping) scores the validation target of the users who have an analysis (it lies
  after every cut-off), fed the mean of their rewarded analyses (or of their cutoff ones), and NDCG@10
  of the same rows without knowledge alongside: the epoch is chosen on rows that read knowledge.
- `use_knowledge=False` trains the plain-SASRec control on exactly the same windows, seeds and rows.
"""

from __future__ import annotations

import io as _io
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from recalign import io, metrics
from recalign.distributed import seed_everything, sharded_mean
from recalign.recsys.ka_sasrec import KAConfig, KASASRec
from recalign.recsys.knowledge import KnowledgeTable, knowledge_table
from recalign.recsys.sasrec import SASRecConfig, next_item_loss
from recalign.recsys.train import SeqTrainConfig, epochs_left, finish_epoch, make_windows, prepare_training, run_trainer


@dataclass
class KAJobSpec:
    """What one KA-SASRec fit needs; passed to every worker."""

    data_dir: str  # prepared dataset
    embeddings_dir: str  # embeddings/<set>.parquet (user_idx, sample_idx, embedding) of the train and cutoff sets
    model: SASRecConfig = field(default_factory=SASRecConfig)
    ka: KAConfig = field(default_factory=KAConfig)
    train: SeqTrainConfig = field(default_factory=SeqTrainConfig)
    use_knowledge: bool = True  # False: the plain-SASRec control, knowledge never fed


def knowledge_windows(sequences: list[np.ndarray], max_len: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-item windows over each train sequence minus its last item (the reward target).

    Returns inputs, targets (W, max_len) as `make_windows` does, owners (W,): the user_idx of each window,
    and target_positions (W, max_len): the index in the user's sequence of each target, -1 on padding.
    """
    inputs, targets, owners, positions = [], [], [], []
    for user, seq in enumerate(sequences):
        held_in = np.asarray(seq)[:-1]
        if len(held_in) < 2:
            continue  # nothing to predict once the reward target is held out
        x, y = make_windows([held_in], max_len)
        _, at = make_windows([np.arange(1, len(held_in) + 1)], max_len)  # the same windows over positions + 1
        inputs.append(x)
        targets.append(y)
        owners.append(torch.full((len(x),), user, dtype=torch.long))
        positions.append(at - 1)
    if not inputs:
        raise ValueError("no user has >= 3 train items; nothing to train KA-SASRec on")
    return torch.cat(inputs), torch.cat(targets), torch.cat(owners), torch.cat(positions)


def pick_samples(present: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """(U,) one random present sample per user for this epoch, -1 where a user has none.

    Seeded by (seed, epoch) so every worker draws the same samples.
    """
    rng = np.random.default_rng([seed, epoch])
    noise = np.where(present, rng.random(present.shape), -1.0)  # (U, N)
    picks = noise.argmax(axis=1)
    return np.where(present.any(axis=1), picks, -1)


def batch_knowledge(table: KnowledgeTable, picks: np.ndarray, owners: torch.Tensor, target_positions: torch.Tensor,
                    cutoff: np.ndarray, dropout: float, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Knowledge (B, d_k) and present (B, L) for a batch of windows owned by `owners` (B,).

    target_positions (B, L): each position's target index in its user's sequence (-1 padding); cutoff (U,):
    the index of each user's first item after the history their analysis was written from. A position reads
    the analysis only if its target lies at or after that cut-off; dropout removes whole windows.
    """
    users = owners.numpy()
    sample = picks[users]  # (B,)
    vectors = torch.from_numpy(table.vectors[users, np.maximum(sample, 0)])  # (B, d_k)
    after = target_positions >= torch.from_numpy(cutoff[users]).unsqueeze(1)  # (B, L)
    present = after & (target_positions >= 0) & torch.from_numpy(sample >= 0).unsqueeze(1)
    if dropout > 0:
        present = present & (torch.rand(len(users), generator=generator) >= dropout).unsqueeze(1)
    return vectors, present


@torch.no_grad()
def score_with_knowledge(model: KASASRec, history: np.ndarray, candidates: np.ndarray,
                         knowledge: np.ndarray | None, present: np.ndarray | None,
                         batch_size: int = 512) -> np.ndarray:
    """(B, C) candidate scores given histories (B, H), knowledge (B, d_k) and present (B,).

    knowledge None scores the no-knowledge path.
    """
    model.eval()
    out = []
    for start in range(0, len(history), batch_size):
        end = start + batch_size
        k = None if knowledge is None else torch.as_tensor(knowledge[start:end])
        p = None if present is None else torch.as_tensor(present[start:end])
        out.append(model(torch.as_tensor(history[start:end]), torch.as_tensor(candidates[start:end]), k, p).float())
    return torch.cat(out).numpy() if out else np.zeros((0, candidates.shape[1]), dtype=np.float32)


@torch.no_grad()
def catalogue_logp(model: KASASRec, history: np.ndarray, target: np.ndarray, knowledge: np.ndarray | None,
                   batch_size: int = 512) -> np.ndarray:
    """(B,) log-probability of each row's target item (B,) over the whole catalogue, given histories (B, H) and
    knowledge (B, d_k) (None: the no-knowledge path)."""
    model.eval()
    out = []
    for start in range(0, len(history), batch_size):
        end = start + batch_size
        k = None if knowledge is None else torch.as_tensor(knowledge[start:end])
        logp = model.catalogue_logp(torch.as_tensor(history[start:end]), k)
        out.append(logp.gather(1, torch.as_tensor(target[start:end]).unsqueeze(1)).squeeze(1).double())
    return torch.cat(out).numpy() if out else np.zeros(0)


def load_knowledge(spec: KAJobSpec, num_users: int, split: str) -> KnowledgeTable:
    """The `split` set's analyses as a KnowledgeTable (an empty one, no sample present, when the run has none)."""
    uri = io.join(spec.embeddings_dir, f"{split}.parquet")
    if io.exists(uri):
        return knowledge_table(io.read_parquet(uri), num_users)
    other = io.join(spec.embeddings_dir, "train.parquet")
    dim = len(io.read_parquet(other)["embedding"][0].as_py()) if io.exists(other) else 1
    return KnowledgeTable(np.zeros((num_users, 1, dim), np.float32), np.zeros((num_users, 1), bool))


def validation_knowledge(rewarded: KnowledgeTable, cutoff: KnowledgeTable) -> tuple[np.ndarray, np.ndarray]:
    """(U, d) and (U,): each user's mean rewarded analysis, or mean cutoff analysis when they have none."""
    has_rewarded = rewarded.present.any(axis=1)
    vectors = np.where(has_rewarded[:, None], rewarded.mean(), cutoff.mean())
    return vectors.astype(np.float32), has_rewarded | cutoff.present.any(axis=1)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop. config: {"spec": KAJobSpec, "on_epoch_end"?, "on_batch"?, "local_checkpoint_dir"?}.

    `on_batch(inputs, targets, owners, present)` sees every training batch and where it read knowledge (tests use
    it as a leakage probe).
    """
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, TensorDataset

    from recalign.data.dataset import Dataset

    spec: KAJobSpec = config["spec"]
    on_epoch_end: Callable[[int], None] | None = config.get("on_epoch_end")
    on_batch: Callable[..., None] | None = config.get("on_batch")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(spec.train.seed)
    dropout_rng = torch.Generator()

    data = Dataset(spec.data_dir)
    knowledge = load_knowledge(spec, data.num_users, "cutoff")
    cutoff = np.zeros(data.num_users, dtype=np.int64)
    cutoff[data.split("cutoff").user_idx] = data.split("cutoff").position
    inputs, targets, owners, positions = knowledge_windows(data.train_sequences(), spec.model.max_len)
    loader = DataLoader(TensorDataset(inputs, targets, owners, positions), batch_size=spec.train.train_batch_size,
                        shuffle=True)
    loader = ray.train.torch.prepare_data_loader(loader)
    valid = data.split("valid")
    valid_vectors, has_knowledge = validation_knowledge(load_knowledge(spec, data.num_users, "train"), knowledge)
    rows = np.nonzero(has_knowledge[valid.user_idx])[0] if has_knowledge.any() else np.arange(len(valid))
    shard = rows[rank::world]  # each worker validates its own rows, all of them users with knowledge
    valid_knowledge = valid_vectors[valid.user_idx[shard]]
    valid_present = has_knowledge[valid.user_idx[shard]] & spec.use_knowledge
    model, core, optimizer, state = prepare_training(KASASRec(data.num_items, spec.model, spec.ka, knowledge.dim),
                                                     spec.train)
    resumed_from = state["epoch"]

    for epoch in epochs_left(state, spec.train, loader):
        picks = pick_samples(knowledge.present, spec.train.seed, epoch)
        # Re-seeded per (epoch, rank) so a resumed run drops the same rows as an uninterrupted one.
        dropout_rng.manual_seed(int(np.random.default_rng([spec.train.seed, epoch, rank]).integers(2**62)))
        dropout = spec.ka.knowledge_dropout if spec.use_knowledge else 1.0
        model.train()
        losses = []
        for batch_in, batch_out, batch_owner, batch_positions in loader:
            vectors, present = batch_knowledge(knowledge, picks, batch_owner.cpu(), batch_positions.cpu(), cutoff,
                                               dropout, dropout_rng)
            if on_batch is not None:
                on_batch(batch_in, batch_out, batch_owner, present)
            states = model(batch_in, None, vectors.to(batch_in.device), present.to(batch_in.device))
            loss = next_item_loss(states, core.item_emb.weight, batch_out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

        report = _validate(core, valid, shard, valid_knowledge, valid_present, spec.train.eval_batch_size)
        report.update(train_loss=float(np.mean(losses)) if losses else float("nan"), resumed_from_epoch=resumed_from,
                      world_size=world)
        finish_epoch(report, state, epoch, core, optimizer, rank, config.get("local_checkpoint_dir"))
        if on_epoch_end is not None:
            on_epoch_end(epoch)


def _validate(core: KASASRec, valid, shard: np.ndarray, knowledge: np.ndarray, present: np.ndarray,
              batch_size: int) -> dict[str, float]:
    """Sharded, all-reduced validation NDCG@10 / HR@10 with the mean knowledge, and NDCG@10 without, on the
    validation rows of the users with knowledge."""
    history, candidates, target = valid.history[shard], valid.candidates[shard], valid.target_index[shard]
    with_k = score_with_knowledge(core, history, candidates, knowledge, present, batch_size)
    without = score_with_knowledge(core, history, candidates, None, None, batch_size)
    return {"valid_ndcg@10": sharded_mean(metrics.ndcg_at_k(with_k, target, 10).numpy()),
            "valid_hr@10": sharded_mean(metrics.hr_at_k(with_k, target, 10).numpy()),
            "valid_ndcg@10_no_knowledge": sharded_mean(metrics.ndcg_at_k(without, target, 10).numpy())}


def fit_ka(spec: KAJobSpec, out_dir: str, storage_path: str, run_name: str,
           on_epoch_end: Callable[[int], None] | None = None,
           on_batch: Callable[..., None] | None = None) -> dict[str, Any]:
    """Train KA-SASRec under a TorchTrainer and write `out_dir/model.pt` + `out_dir/config.json`.

    Re-running with the same `storage_path` + `run_name` resumes from the last checkpoint.
    Returns the final report (validation metrics, best epoch, epochs run).
    """
    best, final = run_trainer(train_loop, {"spec": spec, "on_epoch_end": on_epoch_end, "on_batch": on_batch},
                              spec.train, storage_path, run_name, "KA-SASRec")
    save_ka_model(best, spec, out_dir, final)
    return final


def save_ka_model(state_dict: dict, spec: KAJobSpec, out_dir: str, report: dict) -> None:
    """Atomically write model.pt (weights + configs) and config.json (spec + final report)."""
    buffer = _io.BytesIO()
    blob = {"state_dict": state_dict, "model": asdict(spec.model), "ka": asdict(spec.ka),
            "num_items": int(state_dict["sasrec.item_emb.weight"].shape[0] - 1),
            "knowledge_dim": int(state_dict["adaptor.0.weight"].shape[1])}
    torch.save(blob, buffer)
    io.write_bytes(buffer.getvalue(), io.join(out_dir, "model.pt"))
    io.write_json({"spec": asdict(spec), "report": report}, io.join(out_dir, "config.json"))


def load_ka_model(out_dir: str) -> KASASRec:
    """The KA-SASRec saved by `fit_ka`, in eval mode on CPU."""
    blob = torch.load(_io.BytesIO(io.read_bytes(io.join(out_dir, "model.pt"))), map_location="cpu",
                      weights_only=False)
    model = KASASRec(blob["num_items"], SASRecConfig(**blob["model"]), KAConfig(**blob["ka"]), blob["knowledge_dim"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()
