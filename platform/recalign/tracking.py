"""Experiment tracking in MLflow, beside TensorBoard, through Ray's MLflow integration.

- `TrackingConfig`: a job's `tracking` section; `mlflow_target` resolves it against the run. By default
  a job logs to a file store inside the run (`file:<run dir>/mlflow`; MLflow 3 opens a file store only
  with MLFLOW_ALLOW_FILE_STORE=true, see `allow_file_store`); a run on s3:// or gs:// has nowhere to keep
  one, so it logs to MLflow only when `tracking.tracking_uri` names a server.
- Policies: the driver opens one MLflow run per Ray Train run (`start_run`, found again by its tag when a
  crashed job runs again), the rank-0 worker logs params and metrics into it with `setup_mlflow`, and the
  driver adds the adapter and metrics.json when the policy is published (recalign.align.trainer).
- Sweeps: `trial_callback`, Ray Tune's MLflowLoggerCallback with one run per trial (recalign.align.sweep).

Tracking never changes what a stage makes: it is a job-level section of its own that no fingerprint reads
(`recalign.runs.learning_key` is only ever given the learning configs), so turning it on, off or elsewhere
reruns nothing. mlflow is imported inside the functions that use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from recalign import io
from recalign.config import option
from recalign.runs import Log, RunSpec

RUN_TAG = "recalign.ray_run"  # the Ray Train run (or sweep) an MLflow run belongs to: how a re-run finds it again


@dataclass
class TrackingConfig:
    mlflow: bool = option(True, "log params, metrics and artifacts to MLflow (TensorBoard is written either way)")
    tracking_uri: str = option("", "MLflow tracking URI (http://host:5000, file:/path, ...); '' = a file store in "
                                   "the run, file:<run dir>/mlflow (none when the run is on s3:// or gs://)")
    experiment: str = option("", "MLflow experiment the runs go to; '' = the run name")


@dataclass(frozen=True)
class MlflowTarget:
    """A resolved destination: where runs are logged and under which experiment name."""

    tracking_uri: str
    experiment: str


@dataclass(frozen=True)
class MlflowRun:
    """One open MLflow run, as the training workers are sent it: they log into it and never create one."""

    tracking_uri: str
    experiment_id: str
    run_id: str


def mlflow_target(cfg: TrackingConfig, run: RunSpec, log: Log = print) -> MlflowTarget | None:
    """Where the run's jobs log to MLflow; None when tracking is off, or when the run is on a remote
    filesystem and no tracking URI is set (MLflow's file store needs a local or mounted folder)."""
    if not cfg.mlflow:
        return None
    uri = cfg.tracking_uri
    if not uri:
        run_dir = run.dir()
        if not io.is_local(run_dir):
            log(f"[mlflow] off: the run is in {run_dir}, where MLflow's file store cannot live; set "
                "tracking.tracking_uri (an MLflow server) to track it, or tracking.mlflow=false to silence this")
            return None
        uri = "file:" + os.path.join(run_dir, "mlflow")
    return MlflowTarget(uri, cfg.experiment or run.name)


def allow_file_store(tracking_uri: str) -> None:
    """MLflow 3 refuses its file store (a folder, `file:` URI) unless MLFLOW_ALLOW_FILE_STORE=true: it asks
    for a database, and sqlite needs SQLAlchemy, which mlflow-skinny does not bring. The file store still
    works (in maintenance mode), so a job that chose one says so, in every process that opens it."""
    if urlparse(tracking_uri).scheme in ("", "file"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"


def connect(tracking_uri: str):
    """An MlflowClient of the store."""
    from mlflow import MlflowClient

    allow_file_store(tracking_uri)
    return MlflowClient(tracking_uri)


def experiment_id(mlflow_client, name: str) -> str:
    """The id of experiment `name`, created when missing."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except MlflowException:  # another process created it meanwhile
        return mlflow_client.get_experiment_by_name(name).experiment_id


def start_run(target: MlflowTarget, key: str, tags: dict[str, Any] | None = None) -> MlflowRun:
    """The MLflow run of Ray run `key` (tagged RUN_TAG=key), marked running: the one an earlier attempt
    opened when there is one (a crashed job that runs again resumes its Ray run, so it keeps its MLflow
    run too), else a new one named `key`."""
    mlflow_client = connect(target.tracking_uri)
    exp_id = experiment_id(mlflow_client, target.experiment)
    found = find_run(mlflow_client, exp_id, {RUN_TAG: key})
    if found:
        mlflow_client.update_run(found, status="RUNNING")
        return MlflowRun(target.tracking_uri, exp_id, found)
    run = mlflow_client.create_run(exp_id, run_name=key, tags={RUN_TAG: key, **(tags or {})})
    return MlflowRun(target.tracking_uri, exp_id, run.info.run_id)


def find_run(mlflow_client, exp_id: str, tags: dict[str, str]) -> str:
    """The id of the newest run of the experiment with all these tags; '' if none."""
    where = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = mlflow_client.search_runs([exp_id], filter_string=where, order_by=["attributes.start_time DESC"],
                                     max_results=1)
    return runs[0].info.run_id if runs else ""


def worker_session(run: MlflowRun, params: dict[str, Any]):
    """MLflow in a Ray Train worker (call it on rank 0), logging into the driver's `run`: Ray's setup_mlflow
    logs `params` and resumes the run through MLflow's MLFLOW_RUN_ID (which start_run reads and clears), so
    every attempt of a restarted worker group logs into the same run. Returns the mlflow module."""
    from ray.air.integrations.mlflow import setup_mlflow

    allow_file_store(run.tracking_uri)  # this worker's environment: the driver's setting does not reach it
    os.environ["MLFLOW_RUN_ID"] = run.run_id
    return setup_mlflow(params, tracking_uri=run.tracking_uri, experiment_id=run.experiment_id, rank_zero_only=True)


def end_run(run: MlflowRun, status: str) -> None:
    connect(run.tracking_uri).set_terminated(run.run_id, status=status)


def log_folder(mlflow_client, run_id: str, uri: str, artifact_path: str) -> None:
    """The folder `uri` (local or on any filesystem the run storage supports) as artifacts of the run."""
    with io.local_copy(uri) as local:
        mlflow_client.log_artifacts(run_id, local, artifact_path)


def trial_callback(target: MlflowTarget, tags: dict[str, str], artifact_key: str = "adapter"):
    """Ray Tune's MLflowLoggerCallback (one MLflow run per trial: its config as params, every report as
    metrics, its trial folder as artifacts), and three things the sweep needs on top:

    - metric names MLflow accepts: `valid_ndcg@10` is logged as `valid_ndcg_at_10` (MLflow refuses '@');
    - the folder a trial names in its last report under `artifact_key` (its adapter) is logged with it;
    - a trial restored by a later run of the sweep (its driver died, or it errored) logs into the run it
      had, found by its trial name, instead of opening a second one.

    The class is made here so that importing this module does not import ray.tune and mlflow; Tune pickles
    the callback with the sweep's state, so a restored sweep keeps it.
    """
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class TrialRuns(MLflowLoggerCallback):
        def __init__(self, artifact_key: str, **kwargs):
            super().__init__(**kwargs)
            self.artifact_key = artifact_key

        def setup(self, *args, **kwargs):
            allow_file_store(self.tracking_uri)  # also in the driver of a restored sweep
            super().setup(*args, **kwargs)

        def log_trial_start(self, trial):
            if trial not in self._trial_runs:
                mlflow_client = connect(self.tracking_uri)
                # trial_name: the tag MLflowLoggerCallback gives its runs; the sweep's own tags tell sweeps apart
                found = find_run(mlflow_client, experiment_id(mlflow_client, self.experiment_name),
                                 {**self.tags, "trial_name": str(trial)})
                if found:
                    mlflow_client.update_run(found, status="RUNNING")
                    self._trial_runs[trial] = found
            super().log_trial_start(trial)

        def log_trial_result(self, iteration, trial, result):
            super().log_trial_result(iteration, trial, {k.replace("@", "_at_"): v for k, v in result.items()})

        def log_trial_end(self, trial, failed=False):
            folder = (trial.last_result or {}).get(self.artifact_key)
            if folder and io.exists(folder):
                log_folder(connect(self.tracking_uri), self._trial_runs[trial], folder, self.artifact_key)
            super().log_trial_end(trial, failed)

    return TrialRuns(artifact_key, tracking_uri=target.tracking_uri, experiment_name=target.experiment, tags=tags,
                     save_artifact=True)
