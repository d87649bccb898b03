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
from recalign.errors import MissingInputError
from recalign.recsys.ka_sasrec import KAConfig
from recalign.recsys.knowledge import knowledge_table
from recalign.recsys.sasrec import SASRecConfig
from recalign.recsys.train import SeqTrainConfig
from recalign.reward.encoder import EncoderConfig, embed_samples, resolve_encoder
from recalign.reward.rewards import RewardConfig, compute_rewards, summarise_rewards
from recalign.reward.validation import CompareConfig, compare_on_valid, knowledge_gain
from recalign.runs import Log, RunSpec, input_key, learning_key, run_stage
from recalign.sampling.stage import load_samples
from recalign.systems import markdown_table

KNOWLEDGE_SETS = ("train", "cutoff")  # the rewarded analyses, and those the reward model trains on


def embeddings_stage(run: RunSpec, cfg: EncoderConfig, log: Log = print, force: bool = False) -> dict:
    """embeddings/<set>.parquet for each sample set the run has, and embeddings/config.json (the encoder, which
    evaluation reuses for the analyses it writes)."""
    model_path, max_length = resolve_encoder(cfg)
    key = fingerprint({"samples": input_key(run.dir("samples")), "model": model_path, "max_length": max_length,
                       "text": cfg.text_column})
    out_dir = run.dir("embeddings")

    def build() -> dict:
        rows = {}
        for split in KNOWLEDGE_SETS:
            if split == "cutoff" and not io.exists(run.dir("samples", split, "meta.json")):
                io.delete(io.join(out_dir, f"{split}.parquet"))  # a run sampled without cutoff analyses
                continue
            table = embed_samples(load_samples(run.dir("samples"), split), cfg)
            io.write_parquet(table, io.join(out_dir, f"{split}.parquet"))
            rows[split] = table.num_rows
            dim = len(table["embedding"][0].as_py())
            log(f"[embeddings] {split}: {table.num_rows} analyses of {len(set(table['user_idx'].to_pylist()))} "
                f"users -> {dim}-d")
        io.write_json({**to_dict(cfg), "model_path": model_path, "max_length": max_length},
                      io.join(out_dir, "config.json"))
        return {"rows": rows, "dim": dim, "model": model_path}

    return run_stage("embeddings", out_dir, key, build, log, force)


def encoder_of(run: RunSpec) -> EncoderConfig:
    """The encoder the run embedded its analyses with (embeddings/config.json)."""
    uri = run.dir("embeddings", "config.json")
    if not io.exists(uri):
        raise MissingInputError(f"{uri}: missing; run the embeddings stage first")
    return EncoderConfig(**io.read_json(uri))  # model_path and max_length as resolved when the run embedded


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
        spec = KAJobSpec(run.dir("data"), run.dir("embeddings"), model_cfg, ka_cfg, train_cfg)
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
        rewarded = knowledge_table(io.read_parquet(run.dir("embeddings", "train.parquet")), data.num_users)
        ka = load_ka_model(io.join(out_dir, "ka"))
        plain = load_ka_model(io.join(out_dir, "plain")) if compare_cfg.plain_control else None
        result = compare_on_valid(data, rewarded, ka, plain, compare_cfg,
                                  load_model(baseline_dir) if has_baseline else None)
        # Held-out targets only: the train target (never trained on) and the validation target, read through the
        # rewarded analyses; and the train target read through the cutoff analyses, which cover more users.
        gain = {f"{split}/train": knowledge_gain(ka, data, rewarded, split, compare_cfg) for split in ("train", "valid")}
        if io.exists(run.dir("embeddings", "cutoff.parquet")):
            cutoff = knowledge_table(io.read_parquet(run.dir("embeddings", "cutoff.parquet")), data.num_users)
            gain["train/cutoff"] = knowledge_gain(ka, data, cutoff, "train", compare_cfg)
        result["gain"] = gain
        table = markdown_table(result) + "\n" + gain_table(result["gain"])
        io.write_json(result, io.join(out_dir, "comparison.json"))
        io.write_text(f"# KA-SASRec vs SASRec on validation ({result['num_users_with_knowledge']} users with "
                      f"analyses of {result['num_valid_users']})\n\n{table}", io.join(out_dir, "comparison.md"))
        log(table)
        summary.update(table=table, gain=result["gain"])
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
        knowledge = knowledge_table(io.read_parquet(run.dir("embeddings", "train.parquet")), data.num_users)
        rewards = compute_rewards(load_ka_model(run.dir("reward_model", "ka")), data, knowledge, cfg)
        summary = summarise_rewards(rewards, cfg.kind)
        io.write_parquet(rewards, io.join(out_dir, "rewards.parquet"))
        io.write_json(summary, io.join(out_dir, "summary.json"))
        usable = summary["usable_users"]
        log(f"[rewards] {summary['num_rows']} rewards ({cfg.kind}) for {summary['num_users']} users; users whose "
            f"analyses differ by a usable margin: {usable['logp']['0.01']} by log-probability (0.01 nats), "
            f"{usable['ndcg10']['0.001']} by NDCG@10 + tie-break (0.001); mean NDCG@10 {summary['mean']['ndcg10']:.4f} "
            f"vs {summary['mean']['ndcg10_no_knowledge']:.4f} without knowledge")
        return summary

    return run_stage("rewards", out_dir, key, build, log, force)


def gain_table(gain: dict) -> str:
    """Own analyses vs another user's vs none on the held-out targets, with paired 95% CIs (markdown)."""
    lines = ["Knowledge on held-out targets: the gain in log-probability of the target over the whole catalogue "
             "(nats) and in NDCG@10 among the candidates, fed the user's own analyses, another user's, or none; "
             "per user, paired bootstrap 95% CIs. Targets: the train target (the rewards' target, never trained "
             "on) and the validation target; analyses: the rewarded ones (written one item before the train "
             "target) and the cutoff ones (written before the items the reward model trained on).", "",
             "| target | analyses | users | metric | own vs none | shuffled vs none | own vs shuffled |",
             "|---|---|---|---|---|---|---|"]
    cell = lambda d: f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"  # noqa: E731
    for key, g in gain.items():
        split, analyses = key.split("/")
        for metric in (k for k in g if isinstance(g[k], dict)):
            m = g[metric]
            lines.append(f"| {split} | {'rewarded' if analyses == 'train' else analyses} | {g['num_users']} | "
                         f"{metric} | {cell(m['own_vs_none'])} | {cell(m['shuffled_vs_none'])} | "
                         f"{cell(m['own_vs_shuffled'])} |")
    return "\n".join(lines) + "\n"
