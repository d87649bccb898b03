"""The command line of every job and of the Serve app: --help, print_config, one-line errors (exit 2).

In-process through `launch.run` (what each job's `__main__` calls), plus subprocesses that run the
files as a user does and read the first line of stderr.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys

import launch
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recalign.config import describe
from recalign.data.loaders import DataError
from recalign.errors import ClusterError, UserError, find_user_error
from tests.helpers import REPO

JOBS = ["check", "convert_model", "evaluate", "pipeline", "prepare", "reward", "sample", "spread", "sweep", "train_dpo",
        "train_sasrec"]
MODULES = {name: name for name in JOBS} | {"serve": "serve.app"}


def _generator():
    """docs/generate.py, which finds each job's config class for the configuration reference."""
    spec = importlib.util.spec_from_file_location("generate", os.path.join(REPO, "docs", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


job_class = _generator().job_class


def error_line(capsys, name: str, argv: list[str]) -> str:
    """The one line a mistake prints, checked to be the only thing on stderr, with exit status 2."""
    module = importlib.import_module(MODULES[name])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        launch.run(module.main, argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: ") and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_help_lists_every_key_with_type_default_and_help(name, capsys):
    module = importlib.import_module(MODULES[name])
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as exited:
            module.main([flag])
        assert exited.value.code == 0
        out = capsys.readouterr().out
        rows = describe(job_class(module))
        assert len(rows) > 1
        for row in rows:
            assert f"  {row['key']} " in out or f"  {row['key']}  " in out, row["key"]
            assert row["help"] and row["help"] in out, row["key"]
        assert "print_config=true" in out and "verbose=true" in out
        assert out.splitlines()[0].strip(), "starts with the job's usage"


def test_every_config_field_has_a_help_text():
    for name in sorted(MODULES):
        for row in describe(job_class(importlib.import_module(MODULES[name]))):
            assert len(row["help"]) >= 8, (name, row["key"])


def test_print_config_prints_the_resolved_config(capsys):
    import pipeline

    with pytest.raises(SystemExit) as exited:
        pipeline.main(["preset=demo", "policies.rerank.learning_rate=5e-3", "model=tiny", "seed=1",
                       "print_config=true"])
    assert exited.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["policies"]["rerank"]["learning_rate"] == 0.005, "the override"
    assert cfg["sample"]["num_users"] == 48, "the preset's YAML"
    assert cfg["ka"] == dataclasses.asdict(pipeline.PipelineJob().ka), "the defaults"
    assert cfg["sample"]["model"] == "tiny", "resolved: one model for every stage"
    assert cfg["sample"]["seed"] == pipeline.PipelineJob().sample.seed + 1, "resolved: the run seed applied"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_bad_key_is_one_line_naming_it(name, capsys):
    line = error_line(capsys, name, ["nope.key=1"])
    assert "unknown key(s) nope" in line


def test_bad_values_and_arguments_are_one_line(capsys):
    assert "align.learning_rate: expected a finite number, got 'fast'" in error_line(
        capsys, "train_dpo", ["align.learning_rate=fast"])
    assert "--lr: unknown option" in error_line(capsys, "prepare", ["--lr", "3"])
    assert "preset=nope: unknown preset" in error_line(capsys, "pipeline", ["preset=nope"])
    assert "print_config: expected true/false" in error_line(capsys, "prepare", ["print_config=maybe"])


def test_verbose_shows_the_traceback(tmp_path):
    import prepare

    with pytest.raises(DataError, match="file not found"):
        launch.run(prepare.main, [f"run.root={tmp_path}", "data.source=table", "data.interactions=/nonexistent/i.csv",
                                  "data.items=/nonexistent/t.csv", "verbose=true"])


def test_an_internal_failure_keeps_its_traceback():
    def broken(argv):
        raise KeyError("a bug, not a user mistake")

    with pytest.raises(KeyError):
        launch.run(broken, [])


def _tables(tmp_path, *, drop: str = ""):
    inter = tmp_path / "interactions.csv"
    items = tmp_path / "items.csv"
    rows = [f"u{u},i{(u + k) % 9},{1000 + k}" for u in range(6) for k in range(6)]
    header = "user_id,item_id,timestamp"
    if drop:
        header = ",".join(c for c in header.split(",") if c != drop)
        rows = [",".join(v for c, v in zip("user_id,item_id,timestamp".split(","), r.split(",")) if c != drop)
                for r in rows]
    inter.write_text("\n".join([header, *rows]) + "\n")
    items.write_text("item_id,title\n" + "\n".join(f"i{i},Movie {i}" for i in range(9)) + "\n")
    return [f"data.interactions={inter}", f"data.items={items}"]


@pytest.mark.ray
@pytest.mark.parametrize("name", ["prepare", "train_sasrec", "sample", "pipeline"])
def test_data_jobs_name_a_missing_file_and_a_malformed_table(name, ray_local, tmp_path, capsys):
    run = [f"run.root={tmp_path / 'runs'}", "data.source=table", "model=tiny" if name == "pipeline" else "",
           f"models_dir={tmp_path / 'models'}" if name == "pipeline" else ""]
    run = [a for a in run if a]
    missing = tmp_path / "missing.csv"
    line = error_line(capsys, name, run + [f"data.interactions={missing}", f"data.items={missing}"])
    assert f"{missing}: file not found" in line
    bad = tmp_path / "bad"
    bad.mkdir()
    line = error_line(capsys, name, run + _tables(bad, drop="timestamp"))
    assert f"{bad / 'interactions.csv'}: missing column(s) timestamp" in line
    assert not (tmp_path / "runs" / "demo" / "data" / "meta.json").exists(), "nothing half-written"


def _run_with_data(tmp_path, tiny_data_dir, corrupt: str = "") -> str:
    run = tmp_path / "runs" / "r"
    shutil.copytree(tiny_data_dir, run / "data")
    if corrupt:
        (run / "data" / corrupt).write_bytes(b"this is not parquet")
    return str(run)


@pytest.mark.ray
def test_run_reading_jobs_name_the_missing_stage_and_the_malformed_file(ray_local, tmp_path, tiny_data_dir,
                                                                       tiny_llama_dir, capsys):
    root = tmp_path / "runs"
    common = [f"run.root={root}", "run.name=r", f"model={tiny_llama_dir}"]

    # evaluate: no data yet, then a data table that is not Parquet
    assert "no prepared dataset" in error_line(capsys, "evaluate", common)
    run = _run_with_data(tmp_path, tiny_data_dir, corrupt="examples.parquet")
    line = error_line(capsys, "evaluate", common)
    assert f"{run}/data/examples.parquet: not a readable Parquet table" in line

    # reward: no samples stage, then a samples marker that is not JSON
    line = error_line(capsys, "reward", common[:2])
    assert f"{run}/samples: empty or missing; run the stage that writes it first" in line
    os.makedirs(f"{run}/samples")
    with open(f"{run}/samples/_stage.json", "w") as out:
        out.write("{not json")
    assert f"{run}/samples/_stage.json: not valid JSON" in error_line(capsys, "reward", common[:2])

    # train_dpo and sweep: no pairs, then pairs without their columns
    assert "pairs missing; run the reward stage" in error_line(capsys, "train_dpo", common + ["paths=[rerank]"])
    assert f"{run}/pairs/rerank.parquet: missing; run the pipeline's pairs stage" in error_line(
        capsys, "sweep", common + ["pairs=rerank", "init_adapter="])
    os.makedirs(f"{run}/pairs")
    pq.write_table(pa.table({"user_idx": [1]}), f"{run}/pairs/rerank.parquet")
    line = error_line(capsys, "train_dpo", common + ["paths=[rerank]"])
    assert f"{run}/pairs/rerank.parquet: missing column(s)" in line
    assert "examples.parquet: not a readable Parquet table" in error_line(
        capsys, "sweep", common + ["pairs=rerank", "init_adapter="])


def test_model_spread_and_serve_inputs_are_one_line(tmp_path, tiny_data_dir, capsys):
    assert "/nonexistent.gguf': GGUF file not found" in error_line(
        capsys, "convert_model", ["model=/nonexistent.gguf", f"models_dir={tmp_path}"])
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    assert f"{fake}: not a GGUF file" in error_line(capsys, "convert_model",
                                                    [f"model={fake}", f"models_dir={tmp_path}"])

    root = tmp_path / "runs"
    line = error_line(capsys, "spread", [f"root={root}", "runs=[a,b]"])
    assert f"{root}/a/eval/metrics.json: missing; evaluate run 'a' first" in line
    for name in ("a", "b"):
        os.makedirs(root / name / "eval")
        (root / name / "eval" / "metrics.json").write_text("{")
    assert "metrics.json: not valid JSON" in error_line(capsys, "spread", [f"root={root}", "runs=[a,b]"])

    line = error_line(capsys, "serve", [f"run_dir={tmp_path / 'none'}"])
    assert f"run_dir={tmp_path / 'none'}: no prepared dataset" in line
    run = _run_with_data(tmp_path, tiny_data_dir)
    os.makedirs(f"{run}/policy/rerank/sft")
    line = error_line(capsys, "serve", [f"run_dir={run}", "adapter=policy/rerank/sft"])
    assert "adapter=policy/rerank/sft:" in line and "not a LoRA adapter folder" in line


def test_a_cluster_address_that_does_not_answer_is_one_line(monkeypatch):
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago and takes no connection
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ClusterError, match=f"RAY_ADDRESS=127.0.0.1:{port}: nothing answers there"):
        with launch.ray_session(launch.RayConfig()):
            pass


@pytest.mark.ray
def test_a_user_error_raised_inside_a_ray_task_is_found(ray_local):
    import ray

    @ray.remote
    def read_table():
        raise DataError("items.csv: column title, row 3: missing value")

    with pytest.raises(Exception) as raised:
        ray.get(read_table.remote())
    found = find_user_error(raised.value)
    assert isinstance(found, UserError) and "row 3" in str(found)


def test_the_files_print_one_line_and_exit_2(tmp_path):
    """As a user runs them: the project's interpreter on the job's file, stderr's first line."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.path.join(REPO, "platform")  # this checkout's library, whichever one is installed
    done = subprocess.run([sys.executable, "jobs/prepare.py", f"run.root={tmp_path}", "data.source=table",
                           f"data.interactions={tmp_path}/i.csv", f"data.items={tmp_path}/t.csv"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == f"error: {tmp_path}/i.csv: file not found", done.stderr
    done = subprocess.run([sys.executable, "jobs/pipeline.py", "--help"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "policies.rerank.learning_rate" in done.stdout, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "serve/app.py", "replicas=many"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == "error: overrides: replicas: expected an integer, got 'many'", done.stderr
