"""Stages 2-4 of RLRF4Rec: embed the sampled analyses, train KA-SASRec, score every analysis, build pairs.

    python jobs/reward.py [jobs/configs/reward.yaml] [run.name=demo train.epochs=30 ...]
    python jobs/reward.py jobs/configs/reward.yaml stages=[pairs] pairs.num_negatives=1   # pairs only

Reads runs/<name>/{data,samples}/ and baselines/sasrec/ (hard negatives; also compared on validation);
writes embeddings/, reward_model/ (KA-SASRec, the plain control, the validation comparison), rewards/
and pairs/.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch import RayConfig, parse_args, ray_session, run

from recalign.config import ConfigError, option
from recalign.pairs.build import PairsConfig
from recalign.pairs.stage import pairs_stage
from recalign.recsys.ka_sasrec import KAConfig
from recalign.recsys.sasrec import SASRecConfig
from recalign.recsys.train import SeqTrainConfig
from recalign.reward.encoder import EncoderConfig
from recalign.reward.rewards import RewardConfig
from recalign.reward.stage import embeddings_stage, reward_model_stage, rewards_stage
from recalign.reward.validation import CompareConfig
from recalign.runs import RunSpec

STAGES = ("embeddings", "reward_model", "rewards", "pairs")


@dataclass
class RewardJob:
    run: RunSpec = option(factory=RunSpec, help="run dir holding data/ and samples/")
    ray: RayConfig = option(factory=RayConfig, help="cluster address or embedded Ray settings")
    encoder: EncoderConfig = option(factory=EncoderConfig, help="text encoder (all-MiniLM-L6-v2 by default)")
    model: SASRecConfig = option(factory=SASRecConfig, help="SASRec part of KA-SASRec (and the control)")
    ka: KAConfig = option(factory=KAConfig, help="knowledge adaptor, gate and knowledge dropout")
    train: SeqTrainConfig = option(factory=SeqTrainConfig, help="optimisation, workers, early stopping")
    compare: CompareConfig = option(factory=CompareConfig, help="validation comparison with paired CIs")
    reward: RewardConfig = option(factory=RewardConfig, help="NDCG@10 + tie-break on the train target")
    pairs: PairsConfig = option(factory=PairsConfig, help="paths, K negatives, margin, rerank negatives")
    stages: list[str] = option(factory=lambda: list(STAGES), help="stages to run, in order")
    force: list[str] = option(factory=list, help="stages to rerun even if up to date")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(RewardJob, argv, __doc__)
    unknown = sorted((set(cfg.stages) | set(cfg.force)) - set(STAGES))
    if unknown:
        raise ConfigError(f"stages/force: unknown stage(s) {unknown}; stages are {list(STAGES)}")
    summaries = {}
    with ray_session(cfg.ray, storage={"run.root": cfg.run.root, "pairs.models_dir": cfg.pairs.models_dir}):
        if "embeddings" in cfg.stages:
            summaries["embeddings"] = embeddings_stage(cfg.run, cfg.encoder, force="embeddings" in cfg.force)
        if "reward_model" in cfg.stages:
            summaries["reward_model"] = reward_model_stage(cfg.run, cfg.model, cfg.ka, cfg.train, cfg.compare,
                                                           force="reward_model" in cfg.force)
        if "rewards" in cfg.stages:
            summaries["rewards"] = rewards_stage(cfg.run, cfg.reward, force="rewards" in cfg.force)
        if "pairs" in cfg.stages:
            summaries["pairs"] = pairs_stage(cfg.run, cfg.pairs, force="pairs" in cfg.force)
    return summaries


if __name__ == "__main__":
    run(main)
