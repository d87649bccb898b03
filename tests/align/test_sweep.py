"""Ray Tune sweep of the alignment stage: the search spaces, a real two-trial sweep on the tiny Llama
(every rung reported, results written, the best config and adapter loadable, one MLflow run per trial), a
failed trial retried within the sweep, and an interrupted sweep that continues: a trial that errored (no
retries left)."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid

import numpy as np
import pandas as pd
import pytest

from recalign.align.config import AlignConfig, SweepConfig
from recalign.align.sweep import (METRIC, TrialSpec, letter_ranker_metrics, load_best, param_space, results_frame,
                                  run_sweep, validation_rows, write_results)
from recalign.tracking import MlflowTarget
from tests.helpers.align import SWEEP_TRIAL, adapter_metrics, draw_trials
from tests.helpers.pairs import TEST_PROMPTS, write_pairs

TWO_TRIALS = SweepConfig(loss_types=["dmpo", "sdpo"], betas=[0.5], num_negatives=[1], rungs=2, grace_period=2,
                         max_concurrent=2, valid_users=4)


def test_grid_space_is_every_combination():
    cfg = SweepConfig(loss_types=["dmpo", "sdpo"], betas=[0.1, 1.0], num_negatives=[1, 3])
    space = param_space(cfg)
    assert space == {"loss_type": {"grid_search": ["dmpo", "sdpo"]}, "beta": {"grid_search": [0.1, 1.0]},
                     "num_negatives": {"grid_search": [1, 3]}}
    drawn = {(c["loss_type"], c["beta"], c["num_negatives"]) for c in draw_trials(cfg)}
    assert len(draw_trials(cfg)) == 8 and drawn == {(lt, b, k) for lt in ("dmpo", "sdpo") for b in (0.1, 1.0)
                                              for k in (1, 3)}
    assert len(draw_trials(dataclasses.replace(cfg, num_samples=2))) == 16  # num_samples repeats the grid


def test_random_space_is_seeded_and_within_bounds():
    cfg = SweepConfig(search="random", loss_types=["dmpo", "sdpo"], num_negatives=[1, 3], beta_range=[0.05, 2.0],
                      num_samples=12, seed=3)
    first, again = draw_trials(cfg), draw_trials(cfg)
    assert len(first) == 12 and first == again
    assert draw_trials(dataclasses.replace(cfg, seed=4)) != first
    assert {c["loss_type"] for c in first} <= {"dmpo", "sdpo"} and {c["num_negatives"] for c in first} <= {1, 3}
    betas = np.array([c["beta"] for c in first])
    assert (betas >= 0.05).all() and (betas <= 2.0).all() and len(set(betas)) == 12


def test_unknown_search_is_an_error():
    with pytest.raises(ValueError, match="sweep.search must be grid or random, got 'bayes'"):
        param_space(SweepConfig(search="bayes"))


def test_validation_rows_are_a_seeded_sorted_subset():
    rows = validation_rows(100, 10, seed=0)
    assert len(rows) == 10 == len(set(rows)) and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, validation_rows(100, 10, seed=0))
    np.testing.assert_array_equal(validation_rows(5, 0, seed=0), np.arange(5))
    np.testing.assert_array_equal(validation_rows(5, 9, seed=0), np.arange(5))


@dataclasses.dataclass
class FailOnce:
    """Hook: the first worker (of any trial) to finish optimizer step `step` raises, once in the whole sweep."""

    marker: str
    step: int

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # atomic: one trial claims it
        except FileExistsError:
            return
        raise RuntimeError(f"injected failure after step {step}")


@dataclasses.dataclass
class FailOncePerTrial:
    """Hook: the first attempt of every trial raises after optimizer step `step`. The marker is one file per
    Ray Train run, i.e. per trial (its runs are named sweep-<trial id>), so the trial's retry trains on."""

    marker_dir: str
    step: int

    def __call__(self, step: int, rank: int) -> None:
        import ray.train

        marker = os.path.join(self.marker_dir, ray.train.get_context().get_experiment_name())
        if step == self.step and not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError(f"injected failure after step {step}")


@pytest.fixture(scope="module")
def sweep_inputs(ml100k_dir, tiny_llama_dir, tmp_path_factory):
    """Pairs (4 users, K=1) and 4 validation prompts for the tiny Llama."""
    from transformers import AutoTokenizer

    from recalign.data.dataset import Dataset
    from recalign.rerank.scorer import RerankConfig, build_prompts

    pairs = write_pairs(ml100k_dir, str(tiny_llama_dir), str(tmp_path_factory.mktemp("pairs")), num_users=4,
                        num_negatives=1, paths=("rerank",))
    data = Dataset(ml100k_dir)
    valid = data.split("valid")
    rows = validation_rows(len(valid), TWO_TRIALS.valid_users, TWO_TRIALS.seed)
    rerank = RerankConfig(batch_size=4)
    prompts = build_prompts(data, "valid", rows, AutoTokenizer.from_pretrained(tiny_llama_dir), TEST_PROMPTS)
    return {"pairs": pairs, "prompts": prompts, "target_index": valid.target_index[rows],
            "num_candidates": valid.candidates.shape[1], "rerank": rerank}


def _spec(inputs: dict, model_dir, root, hooks=()) -> TrialSpec:
    return TrialSpec(align=AlignConfig(**SWEEP_TRIAL), model_path=str(model_dir), pairs_uris=inputs["pairs"],
                     prompts=inputs["prompts"], target_index=inputs["target_index"],
                     num_candidates=inputs["num_candidates"], rerank=inputs["rerank"], rungs=TWO_TRIALS.rungs,
                     out_root=str(root / "trials"), storage_path=str(root / "ray"), hooks=list(hooks))


def _trial_runs(tracking: MlflowTarget) -> tuple:
    """(client, the sweep's MLflow runs by their loss_type param: each trial has its own loss type here)."""
    from recalign.tracking import connect

    client = connect(tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(tracking.experiment).experiment_id])
    return client, {r.data.params["loss_type"]: r for r in runs}, len(runs)


@pytest.mark.ray
@pytest.mark.slow
def test_two_trial_sweep_reports_every_rung_and_writes_the_best(ray_local, tiny_llama_dir, sweep_inputs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = _spec(sweep_inputs, tiny_llama_dir, tmp_path)
    logs = []
    tracking = MlflowTarget(f"file:{tmp_path}/mlflow", "sweeps")
    results = run_sweep(TWO_TRIALS, spec, storage_path=spec.storage_path, name="sweep-test", log=logs.append,
                        tracking=tracking)
    assert logs == [], "a fresh sweep, nothing to restore"
    assert len(results) == 2 and not results.errors
    for result in results:
        history = result.metrics_dataframe
        assert history["rung"].tolist() == [1, 2] and history["steps"].tolist() == [2, 4]
        assert history[METRIC].between(0, 1).all() and np.isfinite(history["train_loss"]).all()
        trained = adapter_metrics(result.metrics["adapter"])
        assert trained["loss_type"] == result.config["loss_type"] and trained["steps"] == 4
        assert trained["starts"] == [0, 2], "rung 2 resumed the Ray Train run of rung 1"
    # At K=1 DMPO and S-DPO are the same objective: the two trials train the same adapter.
    by_loss = {r.config["loss_type"]: r.metrics for r in results}
    assert by_loss["dmpo"]["train_loss"] == pytest.approx(by_loss["sdpo"]["train_loss"], rel=1e-4)
    assert by_loss["dmpo"][METRIC] == pytest.approx(by_loss["sdpo"][METRIC], abs=1e-6)

    # One MLflow run per trial: its config as params, each report as metrics (MLflow names take no '@'), its
    # trial folder and its adapter as artifacts.
    client, runs, count = _trial_runs(tracking)
    assert count == 2 and set(runs) == {"dmpo", "sdpo"}
    for result in results:
        logged = runs[result.config["loss_type"]]
        run_id = logged.info.run_id
        assert logged.info.status == "FINISHED" and logged.data.tags["recalign.ray_run"] == "sweep-test"
        assert (logged.data.params["beta"], logged.data.params["num_negatives"]) == ("0.5", "1")
        history = client.get_metric_history(run_id, "valid_ndcg_at_10")
        assert [(m.step, m.value) for m in history] == list(zip([1, 2], result.metrics_dataframe[METRIC]))
        assert [m.value for m in client.get_metric_history(run_id, "rung")] == [1, 2]
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"progress.csv", "result.json", "params.json", "adapter"} <= artifacts
        assert {a.path for a in client.list_artifacts(run_id, "adapter")} >= {
            "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/metrics.json"}

    frame = results_frame(results)
    assert list(frame["loss_type"].sort_values()) == ["dmpo", "sdpo"] and (frame["rungs"] == 2).all()
    assert (frame["error"] == "").all() and frame[METRIC].is_monotonic_decreasing
    out_dir = tmp_path / "sweep"
    out = write_results(frame, spec.align, str(out_dir))
    assert sorted(os.listdir(out_dir)) == ["best.json", "results.csv", "results.md", "sweep.png"]
    assert (out_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out_dir / "results.md").read_text().splitlines()
    assert table[0].startswith("| loss_type | beta | num_negatives | rungs | valid_ndcg@10") and len(table) == 4
    assert len(pd.read_csv(out_dir / "results.csv")) == 2 and out["table"] == "\n".join(table) + "\n"

    best = frame.iloc[0]
    payload = json.loads((out_dir / "best.json").read_text())
    assert payload["metric"] == METRIC and payload["value"] == pytest.approx(best[METRIC])
    assert payload["trial"] == best["trial"] and payload["adapter"] == best["adapter"]
    assert load_best(str(out_dir)) == dataclasses.replace(spec.align, loss_type=best["loss_type"],
                                                          beta=float(best["beta"]),
                                                          num_negatives=int(best["num_negatives"]))

    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), best["adapter"])
    assert policy.peft_config["default"].r == 4
    rescored = letter_ranker_metrics(str(tiny_llama_dir), best["adapter"], sweep_inputs["prompts"],
                                     sweep_inputs["target_index"], sweep_inputs["num_candidates"],
                                     sweep_inputs["rerank"])
    assert rescored[METRIC] == pytest.approx(best[METRIC], abs=1e-6), "the published adapter is the scored one"


@dataclasses.dataclass
class FallingScore:
    """A trial scorer whose k-th call (over the whole sweep) scores 1/k: with one trial at a time, the
    first trial always leads, whatever order the grid is run in."""

    counter_dir: str

    def __call__(self, adapter: str) -> dict:
        calls = len(os.listdir(self.counter_dir)) + 1
        open(os.path.join(self.counter_dir, f"call-{calls}"), "w").close()
        return {METRIC: 1.0 / calls, "valid_hr@1": 0.0, "valid_mrr": 0.0}


@pytest.mark.slow
@pytest.mark.ray
def test_asha_stops_trials_below_the_rung_cutoff(ray_local, tiny_llama_dir, sweep_inputs, tmp_path):
    """Three trials one at a time, two rungs, grace 1, reduction factor 2. The first trial scores 1 at
    rung 1 and goes on; the second scores 1/3 < 1 and the third 1/4 < the median of (1, 1/3): ASHA
    stops both after rung 1. The stopped ones are still in the results, with one rung."""
    counter = tmp_path / "calls"
    counter.mkdir()
    spec = dataclasses.replace(_spec(sweep_inputs, tiny_llama_dir, tmp_path), scorer=FallingScore(str(counter)))
    cfg = SweepConfig(loss_types=["dpo"], betas=[0.1, 0.5, 1.0], num_negatives=[1], rungs=2, grace_period=1,
                      reduction_factor=2, max_concurrent=1, valid_users=4)
    results = run_sweep(cfg, spec, storage_path=spec.storage_path, name="sweep-asha")
    assert len(results) == 3 and not results.errors
    rungs = sorted((r.metrics_dataframe["rung"].tolist(), r.metrics["steps"]) for r in results)
    assert rungs == [([1], 2), ([1], 2), ([1, 2], 4)]
    assert len(os.listdir(counter)) == 4
    frame = results_frame(results)
    assert frame["rungs"].tolist() == [2, 1, 1] and frame[METRIC].tolist() == pytest.approx([0.5, 1 / 3, 1 / 4])


@dataclasses.dataclass
class CountedScore:
    """A trial scorer that scores 0.5 and leaves one file per call in `counter_dir` (safe for concurrent trials)."""

    counter_dir: str

    def __call__(self, adapter: str) -> dict:
        open(os.path.join(self.counter_dir, uuid.uuid4().hex), "w").close()
        return {METRIC: 0.5, "valid_hr@1": 0.0, "valid_mrr": 0.0}


@pytest.mark.slow
@pytest.mark.ray
def test_a_failed_trial_is_retried_from_its_last_rung_within_the_same_fit(ray_local, tiny_llama_dir, sweep_inputs,
                                                                        tmp_path):
    """Both trials fail once, after step 3 (in rung 2, after their rung-1 report); with max_failures=1 Tune
    retries each from its rung-1 checkpoint in the same fit, so one fit finishes both. The retry shows: rung 2
    was reported by a new trial process, as the first result since a restore."""
    markers, counter = tmp_path / "failed", tmp_path / "calls"
    markers.mkdir()
    counter.mkdir()
    spec = dataclasses.replace(_spec(sweep_inputs, tiny_llama_dir, tmp_path, hooks=[FailOncePerTrial(str(markers), 3)]),
                               scorer=CountedScore(str(counter)))  # no re-ranker: the retries are what is tested
    tracking = MlflowTarget(f"file:{tmp_path}/mlflow", "sweeps")
    results = run_sweep(dataclasses.replace(TWO_TRIALS, max_failures=1), spec, storage_path=spec.storage_path,
                        name="sweep-retry", tracking=tracking)
    assert len(results) == 2 and not results.errors
    assert sorted(os.listdir(markers)) == sorted(f"sweep-{r.metrics['trial_id']}" for r in results)
    for result in results:
        history = result.metrics_dataframe
        assert history["rung"].tolist() == [1, 2], "rung 1 was reported once, before the failure"
        assert history["pid"].nunique() == 2 and result.metrics["iterations_since_restore"] == 1
        assert result.metrics["steps"] == 4 and adapter_metrics(result.metrics["adapter"])["steps"] == 4
    assert len(os.listdir(counter)) == 4, "each rung of each trial was scored once"
    client, runs, count = _trial_runs(tracking)
    assert count == 2, "a retried trial keeps its MLflow run"
    for logged in runs.values():
        assert logged.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(logged.info.run_id, "rung")] == [1, 2]
    frame = results_frame(results)
    assert (frame["error"] == "").all() and (frame["rungs"] == 2).all()


def test_load_best_without_a_sweep_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run jobs/sweep.py first"):
        load_best(str(tmp_path))


def test_write_results_with_no_finished_trial_is_an_error(tmp_path):
    frame = pd.DataFrame([{"trial": "a", "loss_type": "dpo", "beta": 0.1, "num_negatives": 1, "rungs": 0,
                           METRIC: float("nan"), "valid_hr@1": float("nan"), "valid_mrr": float("nan"),
                           "train_loss": float("nan"), "reward_accuracy": float("nan"), "adapter": "",
                           "error": "RuntimeError('boom')"}])
    with pytest.raises(RuntimeError, match="no sweep trial finished"):
        write_results(frame, AlignConfig(), str(tmp_path))
    assert (tmp_path / "results.md").exists() and not (tmp_path / "best.json").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_a_trial_that_errored_resumes_from_its_last_rung_when_the_sweep_is_run_again(ray_local, tiny_llama_dir,
                                                                                       sweep_inputs, tmp_path):
    """One trial fails after step 3 (rung 2, after its rung-1 report); running the sweep again restores it
    (Tuner.restore, resume_errored): it trains rung 2 on from its rung-1 Train checkpoint; the other trial,
    finished, is not run again."""
    spec = _spec(sweep_inputs, tiny_llama_dir, tmp_path, hooks=[FailOnce(str(tmp_path / "failed"), step=3)])
    no_retries = dataclasses.replace(TWO_TRIALS, max_failures=0)  # the error ends the trial in this run
    tracking = MlflowTarget(f"file:{tmp_path}/mlflow", "sweeps")
    first = run_sweep(no_retries, spec, storage_path=spec.storage_path, name="sweep-restore", log=print,
                      tracking=tracking)
    assert len(first) == 2 and len(first.errors) == 1 and "injected failure after step 3" in str(first.errors[0])
    errored = next(r for r in first if r.error)
    finished = next(r for r in first if not r.error)
    assert errored.metrics_dataframe["rung"].tolist() == [1]
    finished_adapter = os.path.join(finished.metrics["adapter"], "adapter_model.safetensors")
    finished_mtime = os.stat(finished_adapter).st_mtime_ns
    _, runs, _ = _trial_runs(tracking)
    assert runs[errored.config["loss_type"]].info.status == "FAILED"
    first_runs = {loss_type: r.info.run_id for loss_type, r in runs.items()}

    logs = []
    again = run_sweep(no_retries, spec, storage_path=spec.storage_path, name="sweep-restore", log=logs.append)
    assert len(logs) == 1 and "restoring the sweep" in logs[0]
    assert len(again) == 2 and not again.errors
    by_trial = {r.metrics["trial_id"]: r for r in again}
    resumed = by_trial[errored.metrics["trial_id"]]
    assert resumed.metrics_dataframe["rung"].tolist() == [1, 2], "rung 1 was reported once, before the failure"
    assert resumed.metrics["steps"] == 4 and adapter_metrics(resumed.metrics["adapter"])["starts"] == [0, 2]
    kept = by_trial[finished.metrics["trial_id"]]
    assert kept.metrics_dataframe["rung"].tolist() == [1, 2] and kept.metrics[METRIC] == finished.metrics[METRIC]
    assert os.stat(finished_adapter).st_mtime_ns == finished_mtime, "the finished trial did not train again"
    frame = results_frame(again)
    assert (frame["error"] == "").all() and (frame["rungs"] == 2).all()
    # The restored sweep keeps its MLflow callback, and the resumed trial logs on into the run it had.
    client, runs, count = _trial_runs(tracking)
    assert count == 2 and {loss_type: r.info.run_id for loss_type, r in runs.items()} == first_runs
    assert all(r.info.status == "FINISHED" for r in runs.values())
    resumed_run = runs[errored.config["loss_type"]].info.run_id
    assert [m.step for m in client.get_metric_history(resumed_run, "rung")] == [1, 2]
