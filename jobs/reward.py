"""Stages 2-4 of RLRF4Rec: embed the sampled analyses, train KA-SASRec, score every analysis, build pairs.

    python jobs/reward.py [jobs/configs/reward.yaml] [run.name=demo train.epochs=30 ...]
    python jobs/reward.py jobs/configs/reward.yaml stages=[pairs] pairs.num_negatives=1   # pairs only

Reads runs/<name>/{data,samples}/ and baselines/sasrec/ (hard negatives; also compared on validation);
writes embeddings/, reward_model/ (KA-SASRec, the plain control, the validation comparison), rewards/
and pairs/.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launch import RayConfig, parse_args, ray_session

from recalign.recsys.ka_sasrec import KAConfig
from recalign.recsys.sasrec import SASRecConfig
from recalign.pairs.build import PairsConfig
from recalign.reward.encoder import EncoderConfig
from recalign.reward.rewards import RewardConfig
from recalign.pairs.stage import pairs_stage
from recalign.reward.stage import embeddings_stage, reward_model_stage, rewards_stage
from recalign.reward.validation import CompareConfig
from recalign.runs import RunSpec
from recalign.recsys.train import SeqTrainConfig

STAGES = ("embeddings", "reward_model", "rewards", "pairs")


@dataclass
class RewardJob:
    run: RunSpec = field(default_factory=RunSpec)  # run dir holding data/ and samples/
    ray: RayConfig = field(default_factory=RayConfig)  # cluster address or embedded Ray settings
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # text encoder (all-MiniLM-L6-v2 by default)
    model: SASRecConfig = field(default_factory=SASRecConfig)  # SASRec part of KA-SASRec (and the control)
    ka: KAConfig = field(default_factory=KAConfig)  # knowledge adaptor, gate and knowledge dropout
    train: SeqTrainConfig = field(default_factory=SeqTrainConfig)  # optimisation, workers, early stopping
    compare: CompareConfig = field(default_factory=CompareConfig)  # validation comparison with paired CIs
    reward: RewardConfig = field(default_factory=RewardConfig)  # NDCG@10 + tie-break on the train target
    pairs: PairsConfig = field(default_factory=PairsConfig)  # paths, K negatives, margin, rerank negatives
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # stages to run, in order
    force: list[str] = field(default_factory=list)  # stages to rerun even if up to date


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(RewardJob, argv)
    unknown = sorted((set(cfg.stages) | set(cfg.force)) - set(STAGES))
    if unknown:
        raise SystemExit(f"config error: unknown stage(s) {unknown}; stages are {list(STAGES)}")
    summaries = {}
    with ray_session(cfg.ray):
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
    main()
