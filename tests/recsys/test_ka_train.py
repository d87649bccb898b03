"""KA-SASRec under Ray Train on a tiny dataset: DDP workers, parameters change, resume, early stopping,
and the plain control really ignores the knowledge."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from recalign import io
from recalign.data.dataset import Dataset
from recalign.distributed import seed_everything
from recalign.recsys.ka_sasrec import KAConfig, KASASRec
from recalign.recsys.ka_train import (KAJobSpec, batch_knowledge, fit_ka, knowledge_windows, load_ka_model,
                                      pick_samples, score_with_knowledge)
from recalign.recsys.knowledge import KnowledgeTable
from recalign.recsys.sasrec import SASRecConfig
from recalign.recsys.train import SeqTrainConfig
from tests.helpers.recsys import CANDIDATES, HISTORY, tiny_ka_model

MODEL = SASRecConfig(hidden_size=16, num_layers=1, num_heads=2, dropout=0.1, max_len=8)
KA = KAConfig(adaptor_hidden=8, knowledge_dropout=0.2)


@pytest.fixture(scope="module")
def tiny_spec(ray_local, tiny_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ka-train")
    data_dir = tiny_data_dir
    data = Dataset(data_dir)
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(data.num_users - 4), 2)  # the last 4 users have no analyses
    samples = np.tile([0, 1], data.num_users - 4)
    vectors = rng.normal(size=(len(users), 6)).astype(np.float32)
    table = pa.table({"user_idx": pa.array(users, pa.int32()), "sample_idx": pa.array(samples, pa.int32()),
                      "embedding": pa.array(list(vectors), pa.list_(pa.float32()))})
    emb_dir = str(root / "embeddings")
    io.write_parquet(table, io.join(emb_dir, "cutoff.parquet"))  # what training reads
    io.write_parquet(table.slice(0, 10), io.join(emb_dir, "train.parquet"))  # the rewarded set: validation rows
    train = SeqTrainConfig(epochs=2, train_batch_size=16, learning_rate=5e-3, patience=5, num_workers=2, seed=0)
    return KAJobSpec(data_dir, emb_dir, MODEL, KA, train), root, data


def _initial(data: Dataset, spec: KAJobSpec) -> KASASRec:
    seed_everything(spec.train.seed)  # the loop seeds before building the model
    return KASASRec(data.num_items, spec.model, spec.ka, 6)


def _changed(before: KASASRec, after: KASASRec) -> dict[str, bool]:
    after_params = dict(after.named_parameters())
    return {name: not torch.equal(p, after_params[name]) for name, p in before.named_parameters()}


@pytest.mark.ray
@pytest.mark.slow
def test_ka_training_with_two_workers_changes_every_parameter_and_resumes(tiny_spec):
    spec, root, data = tiny_spec
    storage = str(root / "ray")
    report = fit_ka(spec, str(root / "ka"), storage, "ka-two-workers")
    assert report["world_size"] == 2 and report["param_divergence"] == 0.0
    assert report["epochs_run"] == 2 and 0 <= report["best_epoch"] <= 1
    assert 0.0 < report["best_valid_ndcg"] <= 1.0
    changed = _changed(_initial(data, spec), load_ka_model(str(root / "ka")))
    assert all(changed.values()), [n for n, c in changed.items() if not c]

    # Same run name, more epochs: continues from the last checkpoint instead of starting over.
    resumed = fit_ka(dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=3)),
                     str(root / "ka"), storage, "ka-two-workers")
    assert resumed["resumed_from_epoch"] == 2 and resumed["epochs_run"] == 3


@pytest.mark.ray
def test_plain_control_never_reads_knowledge(tiny_spec):
    spec, root, data = tiny_spec
    fit_ka(dataclasses.replace(spec, use_knowledge=False), str(root / "plain"), str(root / "ray"), "ka-plain")
    changed = _changed(_initial(data, spec), load_ka_model(str(root / "plain")))
    knowledge_params = [n for n in changed if n.startswith(("adaptor.", "gate."))]
    assert knowledge_params and not any(changed[n] for n in knowledge_params)  # no gradient ever reached them
    assert all(changed[n] for n in changed if n.startswith("sasrec.encoder."))


@pytest.mark.ray
def test_early_stopping_stops_after_patience_epochs_without_improvement(tiny_spec):
    spec, root, _ = tiny_spec
    # lr = 0: validation never improves on epoch 0, so patience 1 ends the run after epoch 1.
    train = dataclasses.replace(spec.train, epochs=10, learning_rate=0.0, patience=1, num_workers=0)
    report = fit_ka(dataclasses.replace(spec, train=train), str(root / "stopped"), str(root / "ray"), "ka-stop")
    assert report["epochs_run"] == 2 and report["best_epoch"] == 0


def test_knowledge_windows_hold_out_each_users_last_train_item():
    sequences = [np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([7, 8, 9, 10, 11, 12, 13, 14])]
    inputs, targets, owners, positions = knowledge_windows(sequences, max_len=3)
    # User 0 trains on [1, 2, 3]: inputs (0, 1, 2) -> targets (0, 2, 3); user 1 ([5]) has nothing left.
    assert inputs[owners == 0].tolist() == [[0, 1, 2]] and targets[owners == 0].tolist() == [[0, 2, 3]]
    assert not (owners == 1).any()
    user2 = set(inputs[owners == 2].flatten().tolist()) | set(targets[owners == 2].flatten().tolist())
    assert user2 - {0} == {7, 8, 9, 10, 11, 12, 13}  # 14, the reward target, is never seen
    for user, seq in enumerate(sequences):
        held_out = int(seq[-1])
        assert not (targets[owners == user] == held_out).any() and not (inputs[owners == user] == held_out).any()
        # target_positions index each target in its user's sequence; -1 on padding
        mine, at = targets[owners == user], positions[owners == user]
        assert ((at == -1) == (mine == 0)).all()
        assert all(int(seq[p]) == int(t) for p, t in zip(at[at >= 0], mine[at >= 0]))


def test_pick_samples_draws_present_samples_per_epoch_and_same_on_every_worker():
    present = np.array([[True, True, True], [False, False, False], [False, True, False]])
    picks = {e: pick_samples(present, seed=3, epoch=e) for e in range(20)}
    assert all(p[1] == -1 and p[2] == 1 for p in picks.values())
    assert {int(p[0]) for p in picks.values()} == {0, 1, 2}  # varies over epochs
    assert np.array_equal(pick_samples(present, 3, 5), picks[5])  # deterministic: all workers agree


def test_batch_knowledge_reads_an_analysis_only_after_its_cut_off_and_drops_whole_windows():
    vectors = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    table = KnowledgeTable(vectors, np.array([[True, True], [False, False], [True, False]]))
    picks = np.array([1, -1, 0])
    owners = torch.tensor([0, 1, 2, 0])
    positions = torch.tensor([[-1, 3, 4], [2, 3, 4], [4, 5, 6], [5, 6, 7]])  # each target's index in the sequence
    cutoff = np.array([4, 0, 6])  # user 0's analysis describes items 0-3, user 2's items 0-5
    k, present = batch_knowledge(table, picks, owners, positions, cutoff, dropout=0.0)
    assert present.tolist() == [[False, False, True], [False, False, False], [False, False, True], [True, True, True]]
    assert k[0].tolist() == vectors[0, 1].tolist() and k[2].tolist() == vectors[2, 0].tolist()
    _, dropped = batch_knowledge(table, picks, owners, positions, cutoff, dropout=1.0)
    assert not dropped.any()
    many = torch.zeros((4000, 2), dtype=torch.long) + 9
    _, half = batch_knowledge(table, np.zeros(3, dtype=np.int64), torch.zeros(4000, dtype=torch.long), many, cutoff,
                              0.3, torch.Generator().manual_seed(0))
    assert 0.65 < half[:, 0].float().mean().item() < 0.75 and (half[:, 0] == half[:, 1]).all(), "whole windows"


def test_score_with_knowledge_matches_forward_in_batches():
    model = tiny_ka_model()
    history, candidates = HISTORY.numpy(), CANDIDATES.numpy()
    knowledge = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    present = np.array([True, False])
    scores = score_with_knowledge(model, history, candidates, knowledge, present, batch_size=1)
    expected = model(HISTORY, CANDIDATES, torch.from_numpy(knowledge), torch.from_numpy(present))
    assert scores.shape == (2, 3) and np.allclose(scores, expected.detach().numpy(), atol=1e-5)
