"""The data stage: a run's canonical dataset, skipped when its config is unchanged."""

from recalign.data.stage import prepare_stage
from recalign.runs import RunSpec, fingerprint_of
from tests.helpers.data import tiny_data_config


def test_prepare_stage_writes_the_dataset_once_per_config(tmp_path):
    run = RunSpec(name="t", root=str(tmp_path / "runs"))
    cfg = tiny_data_config(tmp_path, num_users=6)
    logs = []
    summary = prepare_stage(run, cfg, logs.append)
    assert summary["num_users"] == 6 and "config" not in summary
    assert any(line.startswith("[data] tiny: 6 users, 40 items") for line in logs)
    key = fingerprint_of(run.dir("data"))
    assert prepare_stage(run, cfg, logs.append) == summary and logs[-1].startswith("[data] up to date")
    cfg.protocol.num_candidates = 10
    assert prepare_stage(run, cfg, logs.append)["num_users"] == 6
    assert fingerprint_of(run.dir("data")) != key, "a changed protocol rebuilds the data"
