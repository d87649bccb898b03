"""SASRec training on a real multi-node Ray cluster (a head and two worker nodes, one CPU each, on this machine):
a worker node is lost mid-training, and the run resumes from its last checkpoint on the two nodes left."""

import pytest

from tests.helpers.cluster import run_scenario

pytestmark = pytest.mark.ray


@pytest.mark.slow  # 2 to 3 minutes here: three nodes start, two worker groups import torch, ~15 s of heartbeats
def test_training_loses_a_node_and_resumes_from_its_last_checkpoint(tiny_data_dir, tmp_path):
    """tests/helpers/cluster.py `train`: 3 epochs on 2 workers; once epoch 0's checkpoint is registered, the
    worker node holding one of them is killed while both wait in the epoch-0 hook. With max_failures=0 the
    run fails instead ("A worker health check failed ... The actor ... is unavailable")."""
    result = run_scenario("train", str(tmp_path / "train"), "--data", tiny_data_dir, "--epochs", "3", "--retries", "2")
    assert not result["errors"] and "fit_error" not in result, result
    epochs, removed = result["epochs"], result["removed"]
    first = [m for m in epochs if m["epoch"] == 0]
    assert len(first) == 2 and len({m["node"] for m in first}) == 2, "one worker per node"
    assert removed in {m["node"] for m in first} and removed != result["head"], "a worker node with a worker died"
    later = [m for m in epochs if m["epoch"] > 0]
    assert sorted(m["epoch"] for m in later) == [1, 1, 2, 2], "epoch 0 is not trained again"
    assert not {m["pid"] for m in later} & {m["pid"] for m in first}, "a new worker group"
    assert removed not in {m["node"] for m in later} and len({m["node"] for m in later}) == 2, "on the nodes left"
    report = result["report"]
    assert report["resumed_from_epoch"] == 1 and report["epochs_run"] == 3 and report["world_size"] == 2
    assert report["param_divergence"] == 0.0 and result["model_saved"]
