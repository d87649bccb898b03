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
from recalign.recsys.ka_sasrec import KAConfig, KASASRec
from recalign.recsys.ka_train import KAJobSpec, fit_ka, load_ka_model
from recalign.recsys.sasrec import SASRecConfig
from recalign.recsys.train import SeqTrainConfig, seed_everything

pytestmark = pytest.mark.ray

MODEL = SASRecConfig(hidden_size=16, num_layers=1, num_heads=2, dropout=0.1, max_len=8)
KA = KAConfig(adaptor_hidden=8, knowledge_dropout=0.2)


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    from tests.helpers.reward import make_tiny_dataset

    root = tmp_path_factory.mktemp("ka-train")
    data_dir = make_tiny_dataset(root)
    data = Dataset(data_dir)
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(data.num_users - 4), 2)  # the last 4 users have no analyses
    samples = np.tile([0, 1], data.num_users - 4)
    vectors = rng.normal(size=(len(users), 6)).astype(np.float32)
    table = pa.table({"user_idx": pa.array(users, pa.int32()), "sample_idx": pa.array(samples, pa.int32()),
                      "embedding": pa.array(list(vectors), pa.list_(pa.float32()))})
    emb_path = str(root / "embeddings.parquet")
    io.write_parquet(table, emb_path)
    train = SeqTrainConfig(epochs=2, train_batch_size=16, learning_rate=5e-3, patience=5, num_workers=2, seed=0)
    return KAJobSpec(data_dir, emb_path, MODEL, KA, train), root, data


def _initial(data: Dataset, spec: KAJobSpec) -> KASASRec:
    seed_everything(spec.train.seed)  # the loop seeds before building the model
    return KASASRec(data.num_items, spec.model, spec.ka, 6)


def _changed(before: KASASRec, after: KASASRec) -> dict[str, bool]:
    after_params = dict(after.named_parameters())
    return {name: not torch.equal(p, after_params[name]) for name, p in before.named_parameters()}


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


def test_plain_control_never_reads_knowledge(tiny_spec):
    spec, root, data = tiny_spec
    fit_ka(dataclasses.replace(spec, use_knowledge=False), str(root / "plain"), str(root / "ray"), "ka-plain")
    changed = _changed(_initial(data, spec), load_ka_model(str(root / "plain")))
    knowledge_params = [n for n in changed if n.startswith(("adaptor.", "gate."))]
    assert knowledge_params and not any(changed[n] for n in knowledge_params)  # no gradient ever reached them
    assert all(changed[n] for n in changed if n.startswith("sasrec.encoder."))


def test_early_stopping_stops_after_patience_epochs_without_improvement(tiny_spec):
    spec, root, _ = tiny_spec
    # lr = 0: validation never improves on epoch 0, so patience 1 ends the run after epoch 1.
    train = dataclasses.replace(spec.train, epochs=10, learning_rate=0.0, patience=1, num_workers=0)
    report = fit_ka(dataclasses.replace(spec, train=train), str(root / "stopped"), str(root / "ray"), "ka-stop")
    assert report["epochs_run"] == 2 and report["best_epoch"] == 0
