"""The evaluation stage without an LLM: which policies a run has, the LLM user subset, and the baselines'
results, reports and per-system caches on a tiny run."""

import json

import numpy as np
import torch

from recalign import io
from recalign.data.dataset import Dataset
from recalign.evaluation.config import FinalEvalConfig
from recalign.evaluation.stage import discover_policies, evaluate_run, llm_rows
from recalign.recsys.sasrec import SASRec, SASRecConfig
from recalign.recsys.train import SASRecJobSpec, SeqTrainConfig, save_model
from recalign.runs import run_stage
from recalign.sampling.pipeline import select_users
from recalign.systems import EvalConfig
from tests.helpers.data import tiny_run


def _fake_sasrec(run) -> None:
    """A random SASRec published as the sasrec stage would (model.pt, config.json, marker)."""
    data = Dataset(run.dir("data"))
    torch.manual_seed(0)
    model = SASRec(data.num_items, SASRecConfig(hidden_size=8, num_layers=1, num_heads=1, max_len=8))
    out = run.dir("baselines", "sasrec")
    spec = SASRecJobSpec(run.dir("data"), model.cfg, SeqTrainConfig())
    run_stage("sasrec", out, "fake", lambda: save_model(model.state_dict(), spec, out, {}) or {}, lambda _: None)


def _published(run, path: str, label: str, finished: bool = True) -> None:
    folder = run.dir("policy", path, label)
    io.write_text("{}", io.join(folder, "adapter_config.json"))
    if finished:
        run_stage(f"policy/{path}/{label}", folder, f"key-{label}", lambda: {}, lambda _: None)


def test_discover_policies_finds_finished_adapters_in_loss_order(tmp_path):
    run = tiny_run(tmp_path)
    for label in ("sft+sdpo", "sft", "sft+dpo"):
        _published(run, "rerank", label)
    _published(run, "rerank", "sft+dmpo", finished=False)  # crashed before its marker: not a policy yet
    _published(run, "knowledge", "dmpo")
    rerank, knowledge = discover_policies(run)
    assert [p.name for p in rerank] == ["llm zero-shot", "llm sft", "llm sft+dpo", "llm sft+sdpo"]
    assert rerank[0].adapter is None and rerank[1].adapter == run.dir("policy", "rerank", "sft")
    assert rerank[1].key == "key-sft", "the cache key is the adapter stage's fingerprint"
    assert [p.name for p in knowledge] == ["base", "dmpo"]


def test_llm_rows_are_the_sampling_stages_seeded_users(tmp_path):
    data = Dataset(tiny_run(tmp_path).dir("data"))
    rows = llm_rows(data, "test", num_users=5, seed=3)
    users = data.examples("test")["user_idx"].to_numpy()[rows]
    assert sorted(users.tolist()) == select_users(data.examples("test"), 5, 3)["user_idx"].to_pylist()
    assert len(llm_rows(data, "test", 0, 0)) == data.num_users


def test_baselines_are_reported_and_cached_per_system(tmp_path):
    run = tiny_run(tmp_path)
    _fake_sasrec(run)
    cfg = FinalEvalConfig(eval=EvalConfig(num_resamples=50), llm_users=0)
    logs = []
    evaluate_run(run, cfg, "", [], [], log=logs.append)
    result = json.loads(open(run.dir("eval", "metrics.json")).read())
    assert set(result["systems"]) == {"random", "popularity", "sasrec"}
    assert all(s["num_rows"] == 24 for s in result["systems"].values())
    assert "vs_reference" in result["systems"]["random"]["ndcg@10"]
    assert "| sasrec | 24 |" in open(run.dir("eval", "metrics.md")).read()
    assert len(io.read_bytes(run.dir("eval", "metrics.png"))) > 1000
    assert "[evaluate] sasrec: scoring" in logs

    logs.clear()
    evaluate_run(run, cfg, "", [], [], log=logs.append)
    assert {"[evaluate] random: cached", "[evaluate] popularity: cached", "[evaluate] sasrec: cached"} <= set(logs)
    again = json.loads(open(run.dir("eval", "metrics.json")).read())
    assert again["systems"]["sasrec"] == result["systems"]["sasrec"]

    logs.clear()
    evaluate_run(run, FinalEvalConfig(eval=EvalConfig(num_resamples=50, seed=1), llm_users=0), "", [], [],
                 log=logs.append)
    assert "[evaluate] random: scoring" in logs, "a changed evaluation setting is recomputed"
    per_row = io.read_json(run.dir("eval", "systems", "random.json"))
    assert per_row["rows"] == list(range(24)) and len(per_row["metrics"]["ndcg@10"]) == 24
    assert np.isfinite(per_row["metrics"]["mrr"]).all()
