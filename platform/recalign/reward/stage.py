"""Stages 2-3 of RLRF4Rec over a run dir: embeddings -> reward model -> rewards.

    samples/ (sampling stage)  -> embeddings/embeddings.parquet        (Ray Data actor pool)
    data/ + embeddings/        -> reward_model/{ka,plain}/model.pt     (Ray Train, KA-SASRec + control)
                                  reward_model/comparison.{json,md}    (validation, paired CIs)
    reward_model/ + data/      -> rewards/rewards.parquet, summary.json (train targets only)

Every stage is skipped when its output exists for the same config and inputs (`recalign.runs.run_stage`).
Only `train`-split samples and examples are read, so test items never reach any of them. The pairs
built from the rewards are the pairs stage's (`recalign.pairs.stage`).
"""

from __future__ import annotations

import dataclasses

from recalign import io
from recalign.config import fingerprint, to_dict
from recalign.data.dataset import Dataset
from recalign.recsys.ka_sasrec import KAConfig
from recalign.recsys.knowledge import knowledge_table
from recalign.recsys.sasrec import SASRecConfig
from recalign.recsys.train import SeqTrainConfig
from recalign.reward.encoder import EncoderConfig, embed_samples, resolve_encoder
from recalign.reward.rewards import RewardConfig, compute_rewards, summarise_rewards
from recalign.reward.validation import CompareConfig, compare_on_valid
from recalign.runs import Log, RunSpec, input_key, learning_key, run_stage
from recalign.sampling.stage import load_samples
from recalign.systems import markdown_table


def embeddings_stage(run: RunSpec, cfg: EncoderConfig, log: Log = print, force: bool = False) -> dict:
    model_path, max_length = resolve_encoder(cfg)
    key = fingerprint({"samples": input_key(run.dir("samples")), "model": model_path, "max_length": max_length,
                       "text": cfg.text_column})
    out_dir = run.dir("embeddings")

    def build() -> dict:
        samples = load_samples(run.dir("samples"))
        table = embed_samples(samples, cfg)
        io.write_parquet(table, io.join(out_dir, "embeddings.parquet"))
        dim = len(table["embedding"][0].as_py())
        log(f"[embeddings] {table.num_rows} analyses of {len(set(table['user_idx'].to_pylist()))} users -> {dim}-d")
        return {"rows": table.num_rows, "dim": dim, "model": model_path}

    return run_stage("embeddings", out_dir, key, build, log, force)


def reward_model_stage(run: RunSpec, model_cfg: SASRecConfig, ka_cfg: KAConfig, train_cfg: SeqTrainConfig,
                       compare_cfg: CompareConfig, log: Log = print, force: bool = False) -> dict:
    """Train KA-SASRec (and the plain control) under Ray Train; compare them on validation."""
    from recalign.recsys.ka_train import KAJobSpec, fit_ka, load_ka_model
    from recalign.recsys.train import load_model

    baseline_dir = run.dir("baselines", "sasrec")
    has_baseline = io.exists(io.join(baseline_dir, "model.pt"))
    key = fingerprint({"data": input_key(run.dir("data")), "embeddings": input_key(run.dir("embeddings")),
                       "model": learning_key(model_cfg), "ka": learning_key(ka_cfg), "train": learning_key(train_cfg),
                       "compare": to_dict(compare_cfg), "baseline": input_key(baseline_dir) if has_baseline else None})
    out_dir = run.dir("reward_model")

    def train() -> dict:
        spec = KAJobSpec(run.dir("data"), run.dir("embeddings", "embeddings.parquet"), model_cfg, ka_cfg, train_cfg)
        summary = {}
        for name, use_knowledge in (("ka", True), ("plain", False)):
            if name == "plain" and not compare_cfg.plain_control:
                continue
            report = fit_ka(dataclasses.replace(spec, use_knowledge=use_knowledge), io.join(out_dir, name),
                            storage_path=run.dir("ray"), run_name=f"ka-sasrec-{name}-{key}")
            log(f"[reward_model] {name}: best epoch {report['best_epoch']}, valid NDCG@10 "
                f"{report['best_valid_ndcg']:.4f} ({report['epochs_run']} epochs, {train_cfg.num_workers} workers)")
            summary[name] = {k: report[k] for k in ("best_epoch", "best_valid_ndcg", "epochs_run")}
        data = Dataset(run.dir("data"))
        knowledge = knowledge_table(io.read_parquet(spec.embeddings_path), data.num_users)
        plain = load_ka_model(io.join(out_dir, "plain")) if compare_cfg.plain_control else None
        result = compare_on_valid(data, knowledge, load_ka_model(io.join(out_dir, "ka")), plain,
                                  compare_cfg.eval_config(), load_model(baseline_dir) if has_baseline else None)
        table = markdown_table(result)
        io.write_json(result, io.join(out_dir, "comparison.json"))
        io.write_text(f"# KA-SASRec vs SASRec on validation ({result['num_users_with_knowledge']} users with "
                      f"analyses of {result['num_valid_users']})\n\n{table}", io.join(out_dir, "comparison.md"))
        log(table)
        summary["table"] = table
        return summary

    return run_stage("reward_model", out_dir, key, train, log, force)


def rewards_stage(run: RunSpec, cfg: RewardConfig, log: Log = print, force: bool = False) -> dict:
    """Score every (user, sample) on the user's train target with the KA model."""
    from recalign.recsys.ka_train import load_ka_model

    key = fingerprint({"reward_model": input_key(run.dir("reward_model")),
                       "embeddings": input_key(run.dir("embeddings")), "cfg": to_dict(cfg)})
    out_dir = run.dir("rewards")

    def build() -> dict:
        data = Dataset(run.dir("data"))
        knowledge = knowledge_table(io.read_parquet(run.dir("embeddings", "embeddings.parquet")), data.num_users)
        rewards = compute_rewards(load_ka_model(run.dir("reward_model", "ka")), data, knowledge, cfg)
        summary = summarise_rewards(rewards)
        io.write_parquet(rewards, io.join(out_dir, "rewards.parquet"))
        io.write_json(summary, io.join(out_dir, "summary.json"))
        log(f"[rewards] {summary['num_rows']} rewards for {summary['num_users']} users; best != worst for "
            f"{summary['share_best_ne_worst']['ndcg10']:.1%} by NDCG@10, {summary['share_best_ne_worst']['reward']:.1%} "
            f"with the tie-break; mean NDCG@10 {summary['mean']['ndcg10']:.4f} vs "
            f"{summary['mean']['ndcg10_no_knowledge']:.4f} without knowledge")
        return summary

    return run_stage("rewards", out_dir, key, build, log, force)
