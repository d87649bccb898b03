"""The align stage's plan: SFT once, then every loss from it; a sweep's best reaches the preference policies;
each policy is an MLflow run where the tracking config says (a file store in the run by default)."""

import pytest

from recalign.align.config import AlignConfig, PoliciesConfig
from recalign.align.stage import plan_policies


def test_policy_plan_trains_sft_once_then_every_loss_from_it():
    cfg = PoliciesConfig(loss_types=["dpo", "sdpo"], rerank=AlignConfig(sft_max_steps=4, max_steps=3, beta=0.5,
                                                                         num_negatives=3, max_examples=32,
                                                                         sft_max_examples=500))
    plan = plan_policies(cfg)
    assert [(label, init) for label, _, init in plan] == [
        ("knowledge/dpo", ""), ("knowledge/sdpo", ""), ("rerank/sft", ""),
        ("rerank/sft+dpo", "rerank/sft"), ("rerank/sft+sdpo", "rerank/sft")]
    align = {label: a for label, a, _ in plan}
    sft = align["rerank/sft"]
    assert (sft.sft_max_steps, sft.max_steps, sft.num_train_epochs, sft.num_negatives) == (4, 0, 0, 1)
    assert (align["rerank/sft+sdpo"].sft_max_steps, align["rerank/sft+sdpo"].max_steps) == (0, 3)
    # the SFT policy's subset is its own; the preference pairs keep theirs
    assert (sft.max_examples, align["rerank/sft+sdpo"].max_examples) == (500, 32)
    assert align["rerank/sft+sdpo"].loss_type == "sdpo" and align["knowledge/dpo"].sft_max_steps == 0
    # DPO is best vs worst (K=1); the K-negative losses keep the path's K.
    assert align["rerank/sft+dpo"].num_negatives == align["knowledge/dpo"].num_negatives == 1
    assert align["rerank/sft+sdpo"].num_negatives == 3
    # A sweep's best beta and K reach the re-rank preference policies, and never retrain the SFT policy.
    swept = {label: a for label, a, _ in plan_policies(cfg, AlignConfig(beta=0.1, num_negatives=1))}
    assert (swept["rerank/sft+sdpo"].beta, swept["rerank/sft+sdpo"].num_negatives) == (0.1, 1)
    assert swept["rerank/sft"] == sft and swept["knowledge/dpo"] == align["knowledge/dpo"]
    no_sft = plan_policies(PoliciesConfig(paths=["rerank"], loss_types=["dmpo"], rerank=AlignConfig()))
    assert [(label, init) for label, _, init in no_sft] == [("rerank/dmpo", "")]
    with pytest.raises(ValueError, match="loss_types"):
        PoliciesConfig(loss_types=["ipo"])


def test_dpo_takes_one_negative_and_the_sweep_says_why():
    from recalign.align.config import SweepConfig

    with pytest.raises(ValueError, match="best vs worst"):
        AlignConfig(loss_type="dpo", num_negatives=3)
    assert AlignConfig(loss_type="dpo_pairwise_mean", num_negatives=3).num_negatives == 3
    with pytest.raises(ValueError, match="dpo, which takes K=1"):
        SweepConfig(loss_types=["dpo"], num_negatives=[1, 3])


def test_mlflow_goes_to_a_file_store_in_the_run_unless_the_config_says_otherwise(tmp_path, remote_root):
    from recalign.runs import RunSpec
    from recalign.tracking import MlflowTarget, TrackingConfig, mlflow_target

    run = RunSpec(name="t", root=str(tmp_path))
    assert mlflow_target(TrackingConfig(), run) == MlflowTarget(f"file:{tmp_path}/t/mlflow", "t")
    assert mlflow_target(TrackingConfig(tracking_uri="http://mlflow:5000", experiment="recs"), run) == MlflowTarget(
        "http://mlflow:5000", "recs")
    assert mlflow_target(TrackingConfig(mlflow=False, tracking_uri="http://mlflow:5000"), run) is None
    # A run on a remote filesystem has no place for a file store: no MLflow, said once, unless a server is named.
    remote, logs = RunSpec(name="t", root=remote_root + "runs"), []
    assert mlflow_target(TrackingConfig(), remote, logs.append) is None
    assert len(logs) == 1 and "MLflow's file store cannot live" in logs[0] and "tracking.tracking_uri" in logs[0]
    assert mlflow_target(TrackingConfig(tracking_uri="http://mlflow:5000"), remote, logs.append) == MlflowTarget(
        "http://mlflow:5000", "t") and len(logs) == 1


def _only_run(tracking_uri: str, experiment: str):
    """(client, the experiment's one MLflow run)."""
    from recalign.tracking import connect

    client = connect(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


@pytest.mark.ray
def test_policy_stage_logs_the_policy_to_mlflow_where_tracking_says(ray_local, tiny_llama_dir, pairs_uris, tmp_path):
    """A policy is one MLflow run in the run's file store: the align config as params, each step's loss (logged at
    the checkpoints after steps 2 and 3), the adapter and metrics.json."""
    from recalign.align.stage import policy_stage
    from recalign.runs import RunSpec
    from recalign.tracking import TrackingConfig, mlflow_target
    from tests.helpers.align import SMALL_ALIGN, adapter_metrics

    run = RunSpec(name="t", root=str(tmp_path / "runs"))
    cfg = AlignConfig(loss_type="sdpo", num_negatives=3, max_steps=3, save_steps=2, **SMALL_ALIGN)
    target = mlflow_target(TrackingConfig(), run)
    policy_stage(run, cfg, str(tiny_llama_dir), pairs_uris, tracking=target)
    out_dir = run.dir("policy", "sdpo")
    client, logged = _only_run(target.tracking_uri, "t")
    assert logged.info.status == "FINISHED" and logged.info.run_name.startswith("policy-sdpo-")
    params = logged.data.params
    assert (params["loss_type"], params["num_negatives"], params["lora_r"]) == ("sdpo", "3", "4")
    assert float(params["beta"]) == cfg.beta and float(params["learning_rate"]) == cfg.learning_rate
    history = client.get_metric_history(logged.info.run_id, "train/loss")
    steps = adapter_metrics(out_dir)["history"]
    assert [(m.step, m.value) for m in history] == [(h["step"], pytest.approx(h["loss"])) for h in steps]
    assert [m.step for m in history] == [1, 2, 3]
    assert len(client.get_metric_history(logged.info.run_id, "train/reward_accuracy")) == 3
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} == {"adapter", "metrics.json"}
    assert {a.path for a in client.list_artifacts(logged.info.run_id, "adapter")} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    downloaded = client.download_artifacts(logged.info.run_id, "adapter", str(tmp_path / "download"))
    assert open(f"{downloaded}/adapter_model.safetensors", "rb").read() == open(
        f"{out_dir}/adapter_model.safetensors", "rb").read(), "the logged adapter is the published one"


@pytest.mark.ray
@pytest.mark.slow
def test_policy_stage_logs_nothing_when_skipped_or_off_and_follows_another_tracking_uri(ray_local, tiny_llama_dir,
                                                                                          pairs_uris, tmp_path):
    """An up-to-date re-run logs nothing, nor does a forced retrain with MLflow off; another tracking URI gets the
    next policy, and the run's store does not."""
    import dataclasses

    from recalign.align.stage import policy_stage
    from recalign.runs import RunSpec
    from recalign.tracking import TrackingConfig, mlflow_target
    from tests.helpers.align import SMALL_ALIGN

    run = RunSpec(name="t", root=str(tmp_path / "runs"))
    cfg = AlignConfig(loss_type="sdpo", num_negatives=3, max_steps=3, save_steps=2, **SMALL_ALIGN)
    target = mlflow_target(TrackingConfig(), run)
    policy_stage(run, cfg, str(tiny_llama_dir), pairs_uris, tracking=target)
    logged = _only_run(target.tracking_uri, "t")[1]
    policy_stage(run, cfg, str(tiny_llama_dir), pairs_uris, tracking=target)  # up to date: skipped
    policy_stage(run, cfg, str(tiny_llama_dir), pairs_uris, force=True,
                 tracking=mlflow_target(TrackingConfig(mlflow=False), run))
    again = _only_run(target.tracking_uri, "t")[1].info
    assert (again.run_id, again.end_time) == (logged.info.run_id, logged.info.end_time), "neither touched MLflow"

    elsewhere = mlflow_target(TrackingConfig(tracking_uri=f"file:{tmp_path}/elsewhere", experiment="recs"), run)
    policy_stage(run, dataclasses.replace(cfg, max_steps=2), str(tiny_llama_dir), pairs_uris, name="other",
                 tracking=elsewhere)
    client, other = _only_run(elsewhere.tracking_uri, "recs")
    assert [m.step for m in client.get_metric_history(other.info.run_id, "train/loss")] == [1, 2]
    assert _only_run(target.tracking_uri, "t")[1].info.run_id == logged.info.run_id
