"""The sasrec stage on a tiny run: trained once, skipped when only infrastructure settings change."""

import pytest

from recalign.data.dataset import Dataset
from recalign.recsys.sasrec import SASRecConfig
from recalign.recsys.stage import sasrec_key, sasrec_scores, sasrec_stage
from recalign.recsys.train import SeqTrainConfig
from tests.helpers.data import tiny_run

pytestmark = pytest.mark.ray

MODEL = SASRecConfig(hidden_size=16, num_layers=1, num_heads=2, max_len=8)


def test_sasrec_stage_trains_once_and_scores_the_split(ray_local, tmp_path):
    run = tiny_run(tmp_path)
    train = SeqTrainConfig(epochs=2, train_batch_size=32, num_workers=1)
    logs = []
    summary = sasrec_stage(run, MODEL, train, logs.append)
    assert summary["epochs_run"] == 2 and 0.0 < summary["valid_ndcg@10"] <= 1.0
    assert any(line.startswith("[sasrec] best epoch") for line in logs)
    # Another worker count or checkpoint policy trains the same model: the stage is up to date.
    more_workers = SeqTrainConfig(epochs=2, train_batch_size=32, num_workers=2, checkpoints_to_keep=5)
    assert sasrec_key(run, MODEL, more_workers) == sasrec_key(run, MODEL, train)
    assert sasrec_stage(run, MODEL, more_workers, logs.append) == summary and "up to date" in logs[-1]
    assert sasrec_key(run, MODEL, SeqTrainConfig(epochs=3, train_batch_size=32)) != sasrec_key(run, MODEL, train)
    split = Dataset(run.dir("data")).split("test")
    assert sasrec_scores(run, split).shape == split.candidates.shape
