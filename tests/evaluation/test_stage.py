"""The evaluation stage without an LLM: which policies a run has, the LLM user subset, and the baselines'
results, reports and per-system caches on a tiny run."""

import json

import numpy as np
import pytest

from recalign import io
from recalign.config import to_dict
from recalign.data.dataset import Dataset
from recalign.evaluation.config import FinalEvalConfig
from recalign.evaluation.stage import discover_policies, evaluate_run, llm_rows
from recalign.runs import run_stage
from recalign.systems import EvalConfig
from tests.helpers.data import tiny_run
from tests.helpers.recsys import publish_random_sasrec


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


def test_llm_rows_are_seeded_users_whose_analyses_trained_nothing(tmp_path):
    data = Dataset(tiny_run(tmp_path).dir("data"))
    sampled = {0, 1, 2, 3, 7}
    rows = llm_rows(data, "test", num_users=5, seed=3, exclude=sampled)
    users = data.examples("test")["user_idx"].to_numpy()[rows]
    assert len(users) == 5 and not set(users.tolist()) & sampled
    assert np.array_equal(rows, llm_rows(data, "test", 5, 3, sampled)), "seeded"
    assert len(llm_rows(data, "test", 0, 0)) == data.num_users
    assert len(llm_rows(data, "test", 0, 0, sampled)) == data.num_users - 5
    assert len(llm_rows(data, "test", 100, 0, sampled)) == data.num_users - 5, "at most the users left"
    with pytest.raises(ValueError, match="no test user is left"):
        llm_rows(data, "test", 5, 0, set(range(data.num_users)))


def test_baselines_are_reported_and_cached_per_system(tmp_path):
    run = tiny_run(tmp_path)
    publish_random_sasrec(run)
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


def test_llm_results_are_keyed_on_the_model_and_the_encoder(tmp_path, tiny_llama_dir):
    """Every cached LLM-based result changes key when the base model or the run's encoder changes, and the
    baselines' do not: a stale zero-shot or knowledge row cannot survive a new model or encoder."""
    import shutil

    from recalign.evaluation.stage import NO_KNOWLEDGE, Policy, llm_system_keys
    from recalign.prompts import PromptConfig
    from recalign.reward.encoder import EncoderConfig

    run = tiny_run(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_llama_dir, encoder)  # any folder with a config.json stands in for the encoder
    io.write_json({"key": {"prompt": to_dict(PromptConfig())}}, run.dir("samples", "train", "config.json"))
    run_stage("reward_model", run.dir("reward_model"), "rm", lambda: {}, lambda _: None)
    cfg = FinalEvalConfig(eval=EvalConfig(num_resamples=50), llm_users=4)
    rerank = [Policy("llm zero-shot", None), Policy("llm sft", "/adapters/sft", "sft-key")]
    knowledge = [Policy("base", None), Policy("dpo", "/adapters/dpo", "dpo-key")]
    sub = np.arange(4)

    def keys(encoder_cfg: EncoderConfig) -> dict[str, str]:
        io.write_json(to_dict(encoder_cfg), run.dir("embeddings", "config.json"))
        return llm_system_keys(run, cfg, str(model), sub, "base", rerank, knowledge)

    before = keys(EncoderConfig(model_path=str(encoder), max_length=64))
    assert set(before) == {"llm zero-shot", "llm sft", NO_KNOWLEDGE, "ka-sasrec + base knowledge",
                           "ka-sasrec + dpo knowledge"}
    assert keys(EncoderConfig(model_path=str(encoder), max_length=64)) == before, "keys are stable"

    changed_encoder = keys(EncoderConfig(model_path=str(encoder), max_length=32))
    assert changed_encoder["ka-sasrec + base knowledge"] != before["ka-sasrec + base knowledge"]
    assert changed_encoder["llm zero-shot"] == before["llm zero-shot"], "the re-ranker reads no analyses"
    config = json.loads((encoder / "config.json").read_text())
    (encoder / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.5}))
    retrained_encoder = keys(EncoderConfig(model_path=str(encoder), max_length=64))
    assert retrained_encoder["ka-sasrec + dpo knowledge"] != before["ka-sasrec + dpo knowledge"], \
        "new encoder weights under the same path"

    (model / "config.json").write_text(json.dumps({**json.loads((model / "config.json").read_text()),
                                                   "rms_norm_eps": 1e-3}))
    other_model = keys(EncoderConfig(model_path=str(encoder), max_length=64))
    for name in ("llm zero-shot", "llm sft", "ka-sasrec + base knowledge", "ka-sasrec + dpo knowledge"):
        assert other_model[name] != retrained_encoder[name], f"{name}: the model changed"
    assert other_model[NO_KNOWLEDGE] == retrained_encoder[NO_KNOWLEDGE], "KA-SASRec alone reads no LLM"


def test_fusion_and_validation_pick_the_informed_re_ranker(tmp_path, monkeypatch):
    """With a re-ranker that sees the target and one that guesses, validation picks the first, fusion gets a
    weight above 0 from validation users only, and fusion is a system of the test table with its CI."""
    from recalign.evaluation import stage
    from recalign.evaluation.stage import FUSION, Policy

    run = tiny_run(tmp_path)
    publish_random_sasrec(run)
    calls = []

    def fake_llm_system(data, cfg, prompt, split, sub, model_path, policy, split_name=""):
        calls.append((policy.name, split_name or cfg.eval.split, len(sub)))
        rng = np.random.default_rng(len(calls))
        scores = rng.normal(size=(len(sub), split.candidates.shape[1]))
        if policy.name == "llm sft":
            scores[np.arange(len(sub)), split.target_index[sub]] += 2.0
        return {**stage._metric_rows(scores, split.target_index[sub], sub, cfg.eval.metrics),
                "scores": scores.tolist()}

    monkeypatch.setattr(stage, "_llm_system", fake_llm_system)
    cfg = FinalEvalConfig(eval=EvalConfig(num_resamples=50), llm_users=0, valid_users=16)
    policies = [Policy("llm zero-shot", None), Policy("llm sft", "/adapters/sft", "sft-key")]
    evaluate_run(run, cfg, "", policies, [], log=lambda _: None)
    validation = io.read_json(run.dir("eval", "validation.json"))
    assert validation["rows"] == 16 and validation["fusion"]["reranker"] == "llm sft"
    assert validation["fusion"]["weight"] > 0 and set(validation["systems"]) == {"sasrec", "llm zero-shot",
                                                                                "llm sft", FUSION}
    assert sorted(c[1] for c in calls) == ["test", "test", "valid", "valid"]
    summary = io.read_json(run.dir("eval", "metrics.json"))
    entry = summary["systems"][FUSION]
    assert entry["num_rows"] == summary["systems"]["sasrec"]["num_rows"] and "vs_reference" in entry["ndcg@10"]
    assert "llm sft, chosen on 16 validation users" in entry["note"]
    assert {(c["system"], c["baseline"]) for c in summary["comparisons"]} >= {(FUSION, "llm sft"),
                                                                              ("llm sft", "llm zero-shot")}
    # a second evaluation reads every re-ranker from its cache, the validation ones too
    evaluate_run(run, cfg, "", policies, [], log=lambda _: None)
    assert len(calls) == 4


def test_another_run_s_policies_are_scored_with_the_prompt_they_were_trained_on(tmp_path, monkeypatch):
    """transfer_from: the source run's finished re-rank policies are systems of this run, each prompted as its run's
    pairs were; this run has no pairs stage, so its zero-shot is prompted the same way and the two compare."""
    from recalign.errors import MissingInputError
    from recalign.evaluation import stage
    from recalign.prompts import PromptConfig
    from recalign.sampling.engines import EngineConfig

    source = tiny_run(tmp_path / "a", name="source")
    trained = PromptConfig(max_history=3, show_ratings=False, show_genres=False)
    io.write_json({"prompt": to_dict(trained)}, source.dir("pairs", "config.json"))
    for label in ("sft", "sft+sdpo"):
        _published(source, "rerank", label)
    run = tiny_run(tmp_path / "b", name="target")
    publish_random_sasrec(run)
    calls = []

    def fake_llm_system(data, cfg, prompt, split, sub, model_path, policy, split_name=""):
        calls.append((policy.name, policy.adapter, prompt, split_name or cfg.eval.split))
        scores = np.random.default_rng(len(calls)).normal(size=(len(sub), split.candidates.shape[1]))
        return {**stage._metric_rows(scores, split.target_index[sub], sub, cfg.eval.metrics),
                "scores": scores.tolist()}

    monkeypatch.setattr(stage, "_llm_system", fake_llm_system)
    cfg = FinalEvalConfig(eval=EvalConfig(num_resamples=50), llm_users=0, valid_users=-1,
                          transfer_from=source.dir(), transfer_policies=["sft+sdpo"])
    stage.evaluate_stage(run, cfg, "", EngineConfig(), log=lambda _: None)
    assert [(name, adapter, prompt) for name, adapter, prompt, _ in calls] == [
        ("llm zero-shot", None, trained),
        ("llm sft+sdpo (from source)", source.dir("policy", "rerank", "sft+sdpo"), trained)]
    summary = io.read_json(run.dir("eval", "metrics.json"))
    assert summary["systems"]["llm sft+sdpo (from source)"]["num_rows"] == Dataset(run.dir("data")).num_users
    assert ("llm sft+sdpo (from source)", "llm zero-shot") in {(c["system"], c["baseline"])
                                                              for c in summary["comparisons"]}

    with pytest.raises(MissingInputError, match=r"eval.transfer_from=.*: no finished re-rank policy sft\+dmpo .*"
                                                r"it has sft, sft\+sdpo"):
        stage.evaluate_stage(run, FinalEvalConfig(transfer_from=source.dir(), transfer_policies=["sft+dmpo"]), "",
                             EngineConfig(), log=lambda _: None)
