"""The smoke pipeline with run.root=s3://... on a local S3-compatible server (moto), nothing on local disk:
artifacts, Ray Train checkpoints, the converted model, resume after a stage killed mid-training, and Serve
loading an adapter from there."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.helpers import REPO, free_ports
from tests.helpers.s3 import moto_server, s3_env
from tests.helpers.serve import KEY, call

ROOT = "s3://recalign-test/runs"
RUN = "recalign-test/runs/smoke"
FAST = ["policies.loss_types=[sdpo]", "sample.engine.engine=hf", "compare.plain_control=false",
        "sasrec_train.epochs=4", "sasrec_train.patience=10", "ka_train.epochs=2", "eval.llm_users=8",
        "sample.num_users=8"]


def _env(endpoint, tmp_path):
    env = {**os.environ, **s3_env(endpoint), "PYTHONPATH": os.path.join(REPO, "platform"),
           "RECALIGN_MODEL_CACHE": str(tmp_path / "node-cache")}
    env.pop("RAY_ADDRESS", None)
    return env


def _files(endpoint, prefix):
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing",
                           region="us-east-1", scheme="http")
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return fs, {i.path[len(prefix) + 1:]: i for i in infos}


@pytest.mark.slow
def test_the_smoke_pipeline_on_s3_resumes_and_serves_from_there(tmp_path):
    with moto_server() as endpoint:
        env = _env(endpoint, tmp_path)
        pipeline = [sys.executable, os.path.join(REPO, "jobs", "pipeline.py"), "preset=smoke", f"run.root={ROOT}",
                    *FAST]
        # 1. Killed (driver and its embedded Ray) once SASRec has its first checkpoint on S3.
        first = subprocess.Popen(pipeline + ["stages=[data,sasrec]"], env=env, cwd=tmp_path, start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 900
        try:
            while True:
                _, files = _files(endpoint, RUN)
                if any("/checkpoint_" in name and name.endswith("state.pt") for name in files):
                    break
                assert first.poll() is None, "the pipeline ended before SASRec wrote a checkpoint"
                assert time.time() < deadline, "no SASRec checkpoint on S3"
                time.sleep(1)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        _, files = _files(endpoint, RUN)
        assert "baselines/sasrec/_stage.json" not in files, "killed too late: the stage had finished"
        assert not os.listdir(tmp_path) or set(os.listdir(tmp_path)) <= {"node-cache"}, "nothing on local disk"

        # 2. The same command again: data is up to date, SASRec resumes from its checkpoint, every stage runs.
        done = subprocess.run(pipeline, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=2400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "data                 up to date, skipped" in done.stdout
        fs, files = _files(endpoint, RUN)
        for name in ("data/meta.json", "baselines/sasrec/model.pt", "samples/_stage.json", "reward_model/ka/model.pt",
                     "pairs/rerank.parquet", "policy/rerank/sft+sdpo/adapter_model.safetensors",
                     "eval/metrics.json", "eval/metrics.png", "pipeline.log"):
            assert name in files, name
        assert any(n.startswith("ray/sasrec-") and "/checkpoint_" in n for n in files), "Train checkpoints on S3"
        assert any(n.startswith("ray/") and "align" not in n and "/checkpoint_" in n and "ka-sasrec" in n
                   for n in files), "KA-SASRec checkpoints on S3"
        with fs.open_input_stream(f"{RUN}/baselines/sasrec/config.json") as handle:
            report = json.loads(handle.read())["report"]
        assert report["resumed_from_epoch"] >= 1 and report["epochs_run"] == 4, report
        _, models = _files(endpoint, "recalign-test/runs/models")
        assert "tiny-llama/_files.json" in models and "tiny-llama/config.json" in models, sorted(models)
        assert not [p for p in os.listdir(tmp_path) if p not in ("node-cache",)], "outputs only on S3"

        # 3. Serve loads the base model and the adapter from S3.
        port = free_ports(1)[0]
        log = tempfile.TemporaryFile(mode="w+")  # not under tmp_path: that holds only the node cache
        server = subprocess.Popen([sys.executable, os.path.join(REPO, "serve", "app.py"), f"run_dir={ROOT}/smoke",
                                   "model=tiny", "adapter=policy/rerank/sft+sdpo", f"port={port}"],
                                  env={**env, "RECALIGN_API_KEYS": KEY}, cwd=tmp_path, start_new_session=True,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            body = {"history": ["50", "172", "133"], "ratings": [5, 4, 3], "candidates": ["1", "2", "3", "4"]}
            deadline = time.time() + 600
            while True:
                try:
                    status, reply = call(f"http://127.0.0.1:{port}/v1/rerank", body)
                    if status == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None:
                    log.seek(0)
                    pytest.fail("the Serve app exited:\n" + log.read()[-3000:])
                assert time.time() < deadline, "the Serve app never answered"
                time.sleep(3)
            assert sorted(r["item_id"] for r in reply["ranking"]) == ["1", "2", "3", "4"], reply
            assert reply["system"] == "llm:sft+sdpo", reply
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
            log.close()
