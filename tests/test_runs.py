"""Run storage and the skip-if-unchanged stage mechanism every pipeline stage shares."""

import json
import os

import pytest

from recalign import io
from recalign.align.config import AlignConfig
from recalign.recsys.train import SeqTrainConfig
from recalign.runs import (INFRA_KEYS, MARKER, RunSpec, fingerprint_of, input_key, learning_key, run_at, run_stage,
                           slug)


def test_run_dirs_local_and_remote(tmp_path):
    run = RunSpec(name="r1", root=str(tmp_path / "runs"))
    assert run.dir("policy", "rerank", "sft") == str(tmp_path / "runs" / "r1" / "policy" / "rerank" / "sft")
    assert RunSpec(name="r1", root="runs").dir() == os.path.join(os.path.abspath("runs"), "r1")
    assert RunSpec(name="r1", root="s3://bucket/runs/").dir("data") == "s3://bucket/runs/r1/data"
    for bad in ("", "a/b"):
        with pytest.raises(ValueError, match="run.name"):
            RunSpec(name=bad)


def test_the_run_at_a_dir_or_uri_is_the_same_run():
    for run in (RunSpec("demo", "runs"), RunSpec("demo", "/data/runs"), RunSpec("ml1m", "s3://bucket/team/runs")):
        assert run_at(run.dir()) == RunSpec(run.name, run.root if "://" in run.root else os.path.abspath(run.root))
        assert run_at(run.dir() + "/").dir("eval") == run.dir("eval")
    assert run_at("demo") == RunSpec("demo", ".")


def test_a_stage_runs_once_per_fingerprint_and_reruns_when_it_changes(tmp_path):
    out = str(tmp_path / "stage")
    calls, logs = [], []

    def build():
        calls.append(1)
        io.write_text("x", io.join(out, "result.txt"))
        return {"rows": len(calls)}

    assert run_stage("s", out, "k1", build, logs.append) == {"rows": 1}
    assert run_stage("s", out, "k1", build, logs.append) == {"rows": 1} and len(calls) == 1
    assert logs[-1] == "[s] up to date (k1), skipped"
    assert fingerprint_of(out) == "k1"
    marker = json.loads((tmp_path / "stage" / MARKER).read_text())
    assert marker["stage"] == "s" and marker["summary"] == {"rows": 1} and marker["seconds"] >= 0
    assert run_stage("s", out, "k2", build, logs.append) == {"rows": 2}, "a changed fingerprint reruns"
    assert run_stage("s", out, "k2", build, logs.append, force=True) == {"rows": 3}, "force reruns"


def test_a_crash_leaves_no_marker_so_the_stage_reruns(tmp_path):
    out = str(tmp_path / "stage")
    run_stage("s", out, "k1", lambda: {"ok": 1}, lambda _: None)

    def crash():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage("s", out, "k2", crash, lambda _: None)
    assert not (tmp_path / "stage" / MARKER).exists(), "the stale marker is removed before the outputs change"
    with pytest.raises(FileNotFoundError, match="run that stage first"):
        fingerprint_of(out)


def test_input_key_is_the_marker_or_the_listing_of_a_hand_written_folder(tmp_path):
    staged = str(tmp_path / "staged")
    run_stage("s", staged, "abc", lambda: {}, lambda _: None)
    assert input_key(staged) == "abc"
    by_hand = tmp_path / "by_hand"
    by_hand.mkdir()
    (by_hand / "a.parquet").write_bytes(b"1")
    first = input_key(str(by_hand))
    assert first == input_key(str(by_hand))
    (by_hand / "a.parquet").write_bytes(b"12")
    assert input_key(str(by_hand)) != first, "a changed file changes the key"
    with pytest.raises(FileNotFoundError, match="run the stage that writes it"):
        input_key(str(tmp_path / "missing"))


def test_learning_key_drops_where_and_how_fast_a_stage_runs():
    align = learning_key(AlignConfig())
    assert not INFRA_KEYS & set(align) and "learning_rate" in align and "lora_target_modules" in align
    assert learning_key(AlignConfig(num_workers=8, save_total_limit=9, save_steps=7, use_gpu=True)) == align
    assert learning_key(AlignConfig(learning_rate=3e-4)) != align
    seq = learning_key(SeqTrainConfig(eval_batch_size=4, checkpoints_to_keep=5, cpus_per_worker=3))
    assert seq == learning_key(SeqTrainConfig()) and "patience" in seq


def test_slug_makes_file_and_run_names():
    assert slug("llm sft+dpo") == "llm_sft-dpo"
    assert slug("rerank/sft+sdpo") == "rerank_sft-sdpo"
    assert slug("ka-sasrec (no knowledge)") == "ka-sasrec_no_knowledge"
    assert slug("ka-sasrec + base knowledge") == "ka-sasrec_-_base_knowledge"
