"""Align the LLM on preference pairs: DPO, DMPO or S-DPO with K negatives, LoRA, under Ray Train.

    python jobs/train_dpo.py [jobs/configs/train_dpo.yaml] [align.loss_type=dmpo align.num_negatives=7 ...]

Reads <run>/pairs/<path>.parquet for each of `paths` (both by default, concatenated) and writes one
LoRA policy per loss type to <run>/policy/<loss_type>/ (adapter, metrics.json, tensorboard/), and logs
each to MLflow (by default a file store in <run>/mlflow; see `tracking`).
Before the reward stage has produced pairs, `synthetic_pairs.enabled=true` writes heuristic ones
(recalign.align.pairs.heuristic_pairs) for the missing files, for smoke runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from launch import RayConfig, parse_args, ray_session, run

from recalign import io
from recalign.align.config import AlignConfig
from recalign.align.losses import LOSS_TYPES
from recalign.align.stage import policy_stage
from recalign.config import ConfigError, option
from recalign.data.dataset import DataConfig
from recalign.errors import MissingInputError
from recalign.llm.store import local_model
from recalign.pairs.build import PATHS
from recalign.pairs.heuristic import heuristic_pairs
from recalign.prompts import PromptConfig
from recalign.runs import RunSpec
from recalign.tracking import TrackingConfig, mlflow_target


@dataclass
class SyntheticPairsConfig:
    enabled: bool = option(False, "write heuristic pairs where <pairs_dir>/<path>.parquet is missing (smoke runs)")
    num_users: int = option(64, "users per path; 0 = every user of the train split")
    num_negatives: int = option(7, "rejected completions written per row (training uses the first align.num_negatives)")
    seed: int = option(0, "user sample and negatives")


@dataclass
class TrainDPOJob:
    run: RunSpec = option(factory=RunSpec, help="where the run's artifacts live")
    ray: RayConfig = option(factory=RayConfig, help="cluster address or embedded Ray settings")
    model: str = option("smollm2", "base LLM: \"smollm2\" (converted once), \"tiny\" or a local Hugging Face folder")
    models_dir: str = option("", "where named models are converted or built; empty: <run.root>/models when run.root "
                                 "is a URI or an absolute path (shared on a cluster), else ./models")
    paths: list[str] = option(factory=lambda: list(PATHS), help="pairs/<path>.parquet trained on, together")
    pairs_dir: str = option("", "folder of the pairs files; empty = <run>/pairs")
    loss_types: list[str] = option(factory=list, help="one policy per loss type; empty = [align.loss_type]")
    align: AlignConfig = option(factory=AlignConfig, help="losses, LoRA, optimisation, workers, checkpoints")
    data: DataConfig = option(factory=DataConfig, help="dataset for synthetic pairs (prepared if missing)")
    prompt: PromptConfig = option(factory=PromptConfig, help="prompts of synthetic pairs")
    synthetic_pairs: SyntheticPairsConfig = option(factory=SyntheticPairsConfig, help="heuristic pairs for runs "
                                                                                      "before the reward stage")
    tracking: TrackingConfig = option(factory=TrackingConfig, help="MLflow: each policy's params, step metrics, "
                                                                   "adapter and metrics.json (beside TensorBoard)")
    force: bool = option(False, "retrain even if the policy is up to date")


def pairs_uris(cfg: TrainDPOJob) -> list[str]:
    unknown = sorted(set(cfg.paths) - set(PATHS))
    if unknown or not cfg.paths:
        raise ConfigError(f"overrides: paths: must be a non-empty subset of {list(PATHS)}, got {cfg.paths}")
    pairs_dir = cfg.pairs_dir or cfg.run.dir("pairs")
    return [io.join(pairs_dir, f"{path}.parquet") for path in cfg.paths]


def write_synthetic_pairs(cfg: TrainDPOJob, uris: list[str], model_path: str) -> None:
    from transformers import AutoTokenizer

    from recalign.data.stage import prepare_stage

    prepare_stage(cfg.run, cfg.data)
    tokenizer = AutoTokenizer.from_pretrained(local_model(model_path))
    for path, uri in zip(cfg.paths, uris):
        if io.exists(uri):
            continue
        s = cfg.synthetic_pairs
        table = heuristic_pairs(cfg.run.dir("data"), tokenizer, path, s.num_negatives, s.num_users, s.seed, cfg.prompt)
        io.write_parquet(table, uri)
        print(f"[pairs] wrote {table.num_rows} heuristic {path} pairs to {uri}")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(TrainDPOJob, argv, __doc__)
    loss_types = cfg.loss_types or [cfg.align.loss_type]
    if set(loss_types) - set(LOSS_TYPES):
        raise ConfigError(f"overrides: loss_types: must be among {list(LOSS_TYPES)}, got {loss_types}")
    from recalign.llm import resolve_model

    uris = pairs_uris(cfg)
    models_dir = cfg.run.models(cfg.models_dir)
    model_path = resolve_model(cfg.model, models_dir)
    if cfg.synthetic_pairs.enabled:
        write_synthetic_pairs(cfg, uris, model_path)
    missing = [u for u in uris if not io.exists(u)]
    if missing:
        raise MissingInputError(f"{', '.join(missing)}: pairs missing; run the reward stage (jobs/reward.py), or set "
                                "synthetic_pairs.enabled=true")
    summaries = {}
    tracking = mlflow_target(cfg.tracking, cfg.run)
    with ray_session(cfg.ray, storage={"run.root": cfg.run.root, "models_dir": models_dir}):
        for loss_type in loss_types:
            # DPO is best vs worst (K=1), as in RLRF4Rec; the K-negative losses keep align.num_negatives.
            k = 1 if loss_type == "dpo" else cfg.align.num_negatives
            align = dataclasses.replace(cfg.align, loss_type=loss_type, num_negatives=k)
            summaries[loss_type] = policy_stage(cfg.run, align, model_path, uris, force=cfg.force, tracking=tracking)
    print("\n| loss | K | steps | loss (last) | reward acc | margin | tokens/s |\n|---|---|---|---|---|---|---|")
    for loss_type, s in summaries.items():
        f = s["final"]
        print(f"| {loss_type} | {s['num_negatives']} | {s['steps']} | {f.get('loss', float('nan')):.4f} | "
              f"{f.get('reward_accuracy', float('nan')):.3f} | {f.get('reward_margin', float('nan')):.4f} | "
              f"{f.get('tokens_per_s', float('nan')):.0f} |")
    return summaries


if __name__ == "__main__":
    run(main)
