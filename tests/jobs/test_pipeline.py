"""The one-command pipeline: presets, the policy plan, and every stage end to end on the tiny model."""

import json
import os

import pipeline
import pytest

from recalign.config import ConfigError
from recalign.sampling.actors import read_samples


@pytest.mark.parametrize("preset", ["smoke", "demo", "full"])
def test_presets_use_one_model_for_every_stage(preset):
    cfg = pipeline.parse([f"preset={preset}"])
    assert cfg.run.name == preset
    assert cfg.sample.model == cfg.pairs.model == cfg.model
    assert list(cfg.stages) == list(pipeline.STAGES)


def test_the_ml1m_preset_scores_the_demo_s_best_re_ranker_on_ml1m_users():
    cfg = pipeline.parse(["preset=ml1m"])
    assert (cfg.run.name, cfg.data.source, list(cfg.stages)) == ("ml1m", "ml-1m", ["data", "sasrec", "evaluate"])
    assert cfg.eval.transfer_from == "runs/demo" and cfg.eval.transfer_policies == ["sft+sdpo"]
    assert cfg.model == pipeline.parse(["preset=demo"]).model, "the adapters need the demo's base model"


def test_bad_preset_or_stage_is_a_config_error():
    with pytest.raises(ConfigError, match="preset=nope: unknown preset"):
        pipeline.parse(["preset=nope"])
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['allign'\]"):
        pipeline.parse(["preset=smoke", "stages=[data,allign]"])


def test_run_seed_redraws_what_is_learned_or_sampled_on_the_same_rows():
    base, seeded = pipeline.parse(["preset=demo"]), pipeline.parse(["preset=demo", "seed=2"])
    for part in ("sasrec_train", "sample", "ka_train"):
        assert getattr(seeded, part).seed == getattr(base, part).seed + 2, part
    assert seeded.policies.rerank.seed == base.policies.rerank.seed + 2
    assert seeded.policies.knowledge.seed == base.policies.knowledge.seed + 2
    assert seeded.data == base.data, "same protocol and candidates"
    assert seeded.sample.subset_seed == base.sample.subset_seed and seeded.eval == base.eval, "same users"


# The smoke preset, cut further: one loss type, the transformers engine (starts in seconds), no plain
# control. Every stage still runs for real on Ray.
FAST = ["policies.loss_types=[sdpo]", "sample.engine.engine=hf", "compare.plain_control=false",
        "sasrec_train.epochs=2", "ka_train.epochs=2", "eval.llm_users=8", "sample.num_users=8"]


def _smoke_run(tmp_path, capsys) -> tuple[list[str], object]:
    """Every stage of the smoke preset from an empty run dir, checked; returns the pipeline's args and the run."""
    root = tmp_path / "runs"
    args = ["preset=smoke", f"run.root={root}", f"models_dir={tmp_path / 'models'}", *FAST]
    fresh = pipeline.main(args + ["dry_run=true"])["plan"]
    assert [(stage, verdict) for stage, verdict, _ in fresh] == [(stage, "run") for stage in pipeline.STAGES]
    assert "no finished output" in fresh[0][2] and fresh[1][2] == "its input data reruns"
    assert not root.exists() and not (tmp_path / "models").exists(), "a dry run writes nothing"
    summaries = pipeline.main(args)
    run = root / "smoke"
    assert set(summaries) == set(pipeline.STAGES)

    samples = read_samples(str(run / "samples" / "train")).to_pandas()
    assert samples.groupby("user_idx")["sample_idx"].nunique().eq(4).all() and samples["user_idx"].nunique() == 8
    cutoff = read_samples(str(run / "samples" / "cutoff")).to_pandas()
    assert set(cutoff["split"]) == {"cutoff"} and set(cutoff["user_idx"]) == set(samples["user_idx"])
    for rel in ("embeddings/train.parquet", "embeddings/cutoff.parquet", "reward_model/ka/model.pt",
                "reward_model/comparison.json",
                "rewards/rewards.parquet", "pairs/knowledge.parquet", "pairs/rerank.parquet"):
        assert (run / rel).is_file(), rel
    for label in ("knowledge/sdpo", "rerank/sft", "rerank/sft+sdpo"):
        assert (run / "policy" / label / "adapter_model.safetensors").is_file(), label
    sdpo = json.loads((run / "policy" / "rerank" / "sft+sdpo" / "metrics.json").read_text())
    assert sdpo["init_adapter"] == str(run / "policy" / "rerank" / "sft") and sdpo["sft_steps"] == 0
    assert json.loads((run / "policy" / "rerank" / "sft" / "metrics.json").read_text())["sft_steps"] == 2

    result = json.loads((run / "eval" / "metrics.json").read_text())
    systems = result["systems"]
    assert {"random", "popularity", "sasrec", "ka-sasrec (no knowledge)", "ka-sasrec + base knowledge",
            "ka-sasrec + sdpo knowledge", "llm zero-shot", "llm sft", "llm sft+sdpo", "fusion"} == set(systems)
    validation = json.loads((run / "eval" / "validation.json").read_text())
    assert validation["rows"] == 8 and validation["fusion"]["reranker"] in systems
    assert systems["fusion"]["num_rows"] == systems["llm sft"]["num_rows"]
    assert systems["sasrec"]["num_rows"] == 943 and systems["llm sft+sdpo"]["num_rows"] == 8
    assert "vs_reference" in systems["llm sft"]["ndcg@10"]
    assert set(systems["llm zero-shot"]["free_generation"]) == {"valid_ratio", "hr@1_all_rows", "hr@1_valid_rows"}
    assert (run / "eval" / "metrics.png").stat().st_size > 1000 and (run / "eval" / "metrics.md").is_file()
    from recalign.tracking import connect

    client = connect(f"file:{run / 'mlflow'}")  # every policy the align stage trained is an MLflow run
    experiment = client.get_experiment_by_name("smoke")
    finished = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    assert len(finished) == 3, [r.data.tags for r in finished]
    assert (run / "pipeline.log").is_file()  # what goes to it: tests/jobs/test_console.py (here pytest holds stdout)
    assert "llm sft+sdpo (8 of 943 users, none sampled)" in capsys.readouterr().out, "the results table is printed"
    rows = json.loads((run / "eval" / "systems" / "llm_sft-sdpo.json").read_text())["rows"]
    test_users = pipeline_test_users(run)
    assert not {test_users[r] for r in rows} & set(samples["user_idx"]), "LLM systems score users that trained nothing"
    compared = {(c["system"], c["baseline"]) for c in result["comparisons"]}
    assert {("llm sft", "llm zero-shot"), ("llm sft+sdpo", "llm sft"),
            ("ka-sasrec + sdpo knowledge", "ka-sasrec + base knowledge")} <= compared
    return args, run


def _plan_new_beta(args) -> None:
    """The same config, but a new beta for the re-rank preference policy: only it and its evaluation are planned."""
    planned = {stage: (verdict, why) for stage, verdict, why in
               pipeline.main(args + ["policies.rerank.beta=0.5", "dry_run=true"])["plan"]}
    assert all(planned[s][0] == "skip (up to date)" for s in pipeline.STAGES[:-2]), planned
    assert planned["align"][0] == "run" and planned["align"][1].startswith("policy/rerank/sft+sdpo: config or inputs "
                                                                          "changed"), planned["align"]
    assert planned["evaluate"][0] == "run"


@pytest.mark.ray
def test_pipeline_runs_every_stage_and_plans_a_rerun_of_only_what_changed(ray_local, tmp_path, capsys):
    args, _ = _smoke_run(tmp_path, capsys)
    _plan_new_beta(args)


@pytest.mark.ray
@pytest.mark.slow
def test_a_rerun_of_the_pipeline_redoes_only_what_changed(ray_local, tmp_path, capsys):
    args, run = _smoke_run(tmp_path, capsys)
    _plan_new_beta(args)
    pipeline.main(args + ["policies.rerank.beta=0.5"])
    out = capsys.readouterr().out
    for name in ("data", "sasrec", "sample", "embeddings", "reward_model", "rewards", "pairs", "policy/rerank/sft",
                 "policy/knowledge/sdpo"):
        assert f"[{name}] up to date" in out, name
    assert "[policy/rerank/sft+sdpo] running" in out
    assert "[evaluate] llm sft+sdpo: scoring" in out and "[evaluate] llm sft: cached" in out
    assert os.path.isfile(run / "policy" / "rerank" / "sft+sdpo" / "adapter_model.safetensors")


def pipeline_test_users(run) -> list[int]:
    from recalign.data.dataset import Dataset

    return Dataset(str(run / "data")).split("test").user_idx.tolist()
