"""Stages 2-4 of RLRF4Rec over a run dir: embeddings -> reward model -> rewards -> pairs.

    samples/ (sampling stage)  -> embeddings/embeddings.parquet        (Ray Data actor pool)
    data/ + embeddings/        -> reward_model/{ka,plain}/model.pt     (Ray Train, KA-SASRec + control)
                                  reward_model/comparison.{json,md}    (validation, paired CIs)
    reward_model/ + data/      -> rewards/rewards.parquet, summary.json (train targets only)
    samples/ + rewards/ + data/ + baselines/sasrec/ -> pairs/{knowledge,rerank}.parquet, summary.json

Every stage is skipped when its output exists for the same config and inputs (`recalign.stage`).
Only `train`-split samples and examples are read, so test items never reach any of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recalign import io, stage
from recalign.config import fingerprint, to_dict
from recalign.data.dataset import Dataset
from recalign.evaluation.summary import markdown_table
from recalign.recsys.ka_sasrec import KAConfig
from recalign.recsys.sasrec import SASRecConfig
from recalign.pairs.build import PAIRS_SPLIT, PATHS, PairsConfig, knowledge_pairs, rerank_pairs, validate_pairs
from recalign.reward.encoder import EncoderConfig, embed_samples, knowledge_table, resolve_encoder
from recalign.reward.rewards import RewardConfig, compute_rewards, summarise_rewards
from recalign.reward.validation import CompareConfig, compare_on_valid
from recalign.runs import RunSpec
from recalign.recsys.train import SeqTrainConfig

Log = Callable[[str], None]
SAMPLE_COLUMNS = ("user_idx", "split", "sample_idx", "prompt", "response")
# Settings that change where or how fast training runs, not what it learns.
INFRA_KEYS = ("num_workers", "use_gpu", "cpus_per_worker", "max_failures", "checkpoints_to_keep", "eval_batch_size")


def load_samples(samples_dir: str) -> pa.Table:
    """The sampling stage's rows for `train` prompts (other splits are never used for rewards or pairs)."""
    from recalign.sampling.actors import read_samples

    if not io.exists(io.join(samples_dir, "meta.json")):
        raise FileNotFoundError(f"{samples_dir}: no meta.json; the sampling stage has not finished (jobs/sample.py)")
    table = read_samples(samples_dir)
    missing = [c for c in SAMPLE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{samples_dir}: samples table lacks column(s) {missing}")
    table = table.filter(pc.equal(table["split"], PAIRS_SPLIT))
    if table.num_rows == 0:
        raise ValueError(f"{samples_dir}: no samples for {PAIRS_SPLIT!r} prompts")
    frame = table.select(["user_idx", "sample_idx"]).to_pandas()
    if frame.duplicated().any():
        row = frame[frame.duplicated()].iloc[0]
        raise ValueError(f"{samples_dir}: duplicate sample user_idx={row.user_idx} sample_idx={row.sample_idx}")
    per_user = frame.groupby("user_idx").size()
    if per_user.nunique() != 1:
        raise ValueError(f"{samples_dir}: users have different sample counts ({per_user.min()}..{per_user.max()}); "
                         "the sampling stage writes exactly N per user")
    return table.sort_by([("user_idx", "ascending"), ("sample_idx", "ascending")])


def input_key(out_dir: str) -> str:
    """Fingerprint of a stage output: its marker when it has one, else its files' names, sizes and mtimes."""
    if io.exists(io.join(out_dir, stage.MARKER)):
        return stage.fingerprint_of(out_dir)
    import pyarrow.fs as pafs

    fs, path = io.resolve(out_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    listing = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    if not listing:
        raise FileNotFoundError(f"{out_dir}: empty or missing; run the stage that writes it first")
    return hashlib.sha256(repr(listing).encode()).hexdigest()[:16]


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

    return stage.run("embeddings", out_dir, key, build, log, force)


def _train_key(cfg: SeqTrainConfig) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in INFRA_KEYS}


def reward_model_stage(run: RunSpec, model_cfg: SASRecConfig, ka_cfg: KAConfig, train_cfg: SeqTrainConfig,
                       compare_cfg: CompareConfig, log: Log = print, force: bool = False) -> dict:
    """Train KA-SASRec (and the plain control) under Ray Train; compare them on validation."""
    from recalign.recsys.ka_train import KAJobSpec, fit_ka, load_ka_model
    from recalign.recsys.train import load_model

    baseline_dir = run.dir("baselines", "sasrec")
    has_baseline = io.exists(io.join(baseline_dir, "model.pt"))
    key = fingerprint({"data": input_key(run.dir("data")), "embeddings": input_key(run.dir("embeddings")),
                       "model": to_dict(model_cfg), "ka": to_dict(ka_cfg), "train": _train_key(train_cfg),
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

    return stage.run("reward_model", out_dir, key, train, log, force)


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

    return stage.run("rewards", out_dir, key, build, log, force)


def pairs_stage(run: RunSpec, cfg: PairsConfig, log: Log = print, force: bool = False) -> dict:
    """Write pairs/<path>.parquet for each configured path and pairs/summary.json."""
    from recalign.llm import resolve_model

    model_path = resolve_model(cfg.model, cfg.models_dir) if "rerank" in cfg.paths else ""
    hard = "rerank" in cfg.paths and cfg.negatives == "hard"
    key = fingerprint({
        "data": input_key(run.dir("data")), "cfg": to_dict(cfg), "model": model_path,
        "knowledge": [input_key(run.dir("samples")), input_key(run.dir("rewards"))] if "knowledge" in cfg.paths
        else None, "sasrec": input_key(run.dir("baselines", "sasrec")) if hard else None})
    out_dir = run.dir("pairs")

    def build() -> dict:
        summary: dict = {"num_negatives": cfg.num_negatives, "margin": cfg.margin}
        for path in PATHS:
            if path not in cfg.paths:
                io.delete(io.join(out_dir, f"{path}.parquet"))  # never leave a stale set beside fresh ones
                continue
            table, counts = _build_path(run, cfg, path, model_path)
            validate_pairs(table, f"pairs/{path}")
            io.write_parquet(table, io.join(out_dir, f"{path}.parquet"))
            summary[path] = counts
            log(f"[pairs] {path}: {counts['kept']} pairs of {counts['users']} users, K={cfg.num_negatives} "
                + (f"({counts['dropped_margin']} dropped by margin {cfg.margin:g})" if path == "knowledge"
                   else f"({cfg.negatives} negatives)"))
        io.write_json(summary, io.join(out_dir, "summary.json"))
        return summary

    return stage.run("pairs", out_dir, key, build, log, force)


def _build_path(run: RunSpec, cfg: PairsConfig, path: str, model_path: str) -> tuple[pa.Table, dict]:
    if path == "knowledge":
        rewards = io.read_parquet(run.dir("rewards", "rewards.parquet"))
        return knowledge_pairs(load_samples(run.dir("samples")), rewards, cfg)
    from transformers import AutoTokenizer

    from recalign.recsys.train import load_model, score_split

    data = Dataset(run.dir("data"))
    scores = None
    if cfg.negatives == "hard":
        split = data.split(PAIRS_SPLIT)
        scores = score_split(load_model(run.dir("baselines", "sasrec")), split.history, split.candidates)
    return rerank_pairs(data, AutoTokenizer.from_pretrained(model_path), cfg, np.asarray(scores) if scores is not None
                        else None)
