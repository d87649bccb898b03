"""jobs/sweep.py: the shipped grid, the sweep's name, and a sweep whose driver is killed continues when run
again (MLflow runs included)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.helpers import REPO
from tests.helpers.align import SWEEP_TRIAL, adapter_metrics, draw_trials
from tests.helpers.pairs import write_pairs


def test_shipped_sweep_yaml_is_an_eight_trial_grid():
    import sweep

    from recalign.config import load_config

    cfg = load_config(sweep.SweepJob, os.path.join(REPO, "jobs", "configs", "sweep.yaml"))
    assert len(draw_trials(cfg.sweep)) == 8 and cfg.sweep.rungs == 2 and cfg.align.num_workers == 2


def test_sweep_name_is_what_the_trials_learn_not_how_they_run(tmp_path):
    """Retries and concurrency change how a sweep runs, not what it finds: changing them continues the sweep;
    a searched value starts another. A config without the retries key gets the name it had before the key."""
    import dataclasses

    import sweep

    from recalign.config import fingerprint, to_dict
    from recalign.pairs.stage import rerank_prompt
    from recalign.runs import RunSpec, learning_key

    cfg = sweep.SweepJob(run=RunSpec(name="t", root=str(tmp_path)))
    name = sweep.sweep_name(cfg, "model", "", "pairs")
    ran_otherwise = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, max_failures=0, max_concurrent=4))
    assert sweep.sweep_name(ran_otherwise, "model", "", "pairs") == name
    assert sweep.sweep_name(dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, betas=[0.5])), "model", "",
                            "pairs") != name
    before = {k: v for k, v in to_dict(cfg.sweep).items() if k not in ("max_concurrent", "max_failures")}
    # The re-rank fields as they were before rerank.engine and its vLLM knobs existed.
    rerank_before = {k: v for k, v in to_dict(cfg.rerank).items() if k != "engine" and not k.startswith("vllm_")}
    assert name == "sweep-" + fingerprint({"sweep": before, "align": learning_key(cfg.align), "init": "",
                                           "rerank": rerank_before, "prompt": to_dict(rerank_prompt(cfg.run)),
                                           "model": "model", "pairs": "pairs"})
    on_vllm = dataclasses.replace(cfg, rerank=dataclasses.replace(cfg.rerank, engine="vllm"))
    assert sweep.sweep_name(on_vllm, "model", "", "pairs") != name, "another engine scores the trials"
    more_cache = dataclasses.replace(on_vllm, rerank=dataclasses.replace(on_vllm.rerank, vllm_kv_cache_gb=4.0))
    assert sweep.sweep_name(more_cache, "model", "", "pairs") == sweep.sweep_name(on_vllm, "model", "", "pairs")


def _trials_done(storage_dir, rungs: int) -> set[str]:
    """Trials that, in the sweep state saved to storage (what Tuner.restore reads), finished or reported their
    last rung. Tune syncs that state when a trial checkpoints (each rung does), not when it terminates."""
    states = sorted(storage_dir.glob("sweep-*/experiment_state-*.json"))  # the Train runs' dirs have none
    if not states:
        return set()
    try:
        trials = [(json.loads(t), json.loads(meta)) for t, meta in json.loads(states[-1].read_text())["trial_data"]]
    except (json.JSONDecodeError, KeyError):  # caught mid-write
        return set()
    return {t["trial_id"] for t, meta in trials
            if t["status"] == "TERMINATED" or (meta.get("last_result") or {}).get("rung") == rungs}


def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid`, from /proc."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()  # after "pid (comm)": state ppid pgrp session ...
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # a zombie is already dead
            pids.append(int(entry))
    return pids


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver (when still running) and every process of the session it leads; wait until gone.

    Ray's worker processes move to process groups of their own, so killing the driver's group is not
    enough; they all stay in the session that start_new_session=True gave the driver.
    """
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.time() + 60
    while pids := _session_pids(proc.pid):
        assert time.time() < deadline, f"processes {pids} of session {proc.pid} survive SIGKILL"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _start(args: list[str], env: dict, log_path) -> subprocess.Popen:
    """The job in a new session (so that it and its Ray can be killed alone), output to log_path."""
    with open(log_path, "w") as log:
        return subprocess.Popen(args, cwd=log_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.mark.slow
def test_sweep_job_killed_mid_sweep_continues_when_run_again(ml100k_dir, tiny_llama_dir, tmp_path):
    """jobs/sweep.py in its own process with its own embedded Ray: killed (SIGKILL, its whole session) once
    the first of two sequential trials has reported its last rung, then run again: it restores the sweep,
    keeps the finished trial as it was, finishes the other and writes the results."""
    import re

    run_dir = tmp_path / "runs" / "t"
    shutil.copytree(ml100k_dir, run_dir / "data")
    write_pairs(ml100k_dir, str(tiny_llama_dir), str(run_dir / "pairs"), num_users=4, num_negatives=1,
                paths=("rerank",))
    args = [sys.executable, os.path.join(REPO, "jobs", "sweep.py"), f"run.root={tmp_path / 'runs'}", "run.name=t",
            f"model={tiny_llama_dir}", "ray.num_cpus=2", "rerank.batch_size=4",
            "sweep.loss_types=[dmpo,sdpo]", "sweep.betas=[0.5]", "sweep.num_negatives=[1]", "sweep.rungs=2",
            "sweep.grace_period=2", "sweep.max_concurrent=1", "sweep.valid_users=4",
            *[f"align.{k}={v}" for k, v in SWEEP_TRIAL.items()]]
    # Its own embedded Ray: nothing that would point it at the test session's.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(os.path.join(REPO, p) for p in ("platform", "jobs")))

    first_log = tmp_path / "first.log"
    proc = _start(args, env, first_log)
    try:
        deadline = time.time() + 400
        while not (finished := _trials_done(run_dir / "ray", rungs=2)):
            assert proc.poll() is None, f"the sweep exited early:\n{first_log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no trial finished in time:\n{first_log.read_text()[-3000:]}"
            time.sleep(1)
        assert proc.poll() is None, "the sweep finished before it could be interrupted"
    finally:
        _kill_session(proc)
    for ray_tmp in set(re.findall(r"(/tmp/rcray-[A-Za-z0-9_]+)", first_log.read_text())):
        shutil.rmtree(ray_tmp, ignore_errors=True)  # the killed driver could not remove its embedded Ray's files
    (done,) = finished
    assert not (run_dir / "sweep" / "best.json").exists()
    done_adapter = run_dir / "sweep" / "trials" / done
    done_mtime = (done_adapter / "adapter_model.safetensors").stat().st_mtime_ns
    (done_progress,) = (run_dir / "ray").glob(f"sweep-*/trial_{done}_*/progress.csv")
    assert pd.read_csv(done_progress)["rung"].tolist() == [1, 2]

    second_log = tmp_path / "second.log"
    proc = _start(args, env, second_log)
    try:
        returncode = proc.wait(timeout=500)
    finally:
        _kill_session(proc)
    output = second_log.read_text()
    assert returncode == 0, output[-3000:]
    assert "restoring the sweep" in output and "best: " in output
    frame = pd.read_csv(run_dir / "sweep" / "results.csv", dtype={"trial": str, "error": str},
                        keep_default_na=False)
    assert len(frame) == 2 and (frame["error"] == "").all() and (frame["rungs"] == 2).all()
    assert json.loads((run_dir / "sweep" / "best.json").read_text())["trial"] in set(frame["trial"])
    assert (done_adapter / "adapter_model.safetensors").stat().st_mtime_ns == done_mtime, "finished trial not rerun"
    assert pd.read_csv(done_progress)["rung"].tolist() == [1, 2]
    for trial_id in frame["trial"]:
        trained = adapter_metrics(str(run_dir / "sweep" / "trials" / trial_id))
        assert trained["steps"] == 4 and trained["starts"][0] == 0
    # MLflow by default: a file store in the run, one run per trial; the trial the killed driver left running
    # went on in its own run when the sweep was restored.
    from recalign.tracking import connect

    client = connect(f"file:{run_dir / 'mlflow'}")  # the sweep ran in another process: this one allows the store
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for logged in runs:
        assert [m.step for m in client.get_metric_history(logged.info.run_id, "rung")] == [1, 2]
