"""Train the SASRec baseline under Ray Train (DDP, checkpoint every epoch, early stopping).

    python jobs/train_sasrec.py [jobs/configs/train_sasrec.yaml] [train.num_workers=2 ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launch import RayConfig, parse_args, ray_session

from recalign.data.stage import prepare_stage
from recalign.recsys.stage import sasrec_stage
from recalign.data.dataset import DataConfig
from recalign.recsys.sasrec import SASRecConfig
from recalign.runs import RunSpec
from recalign.recsys.train import SeqTrainConfig


@dataclass
class TrainSASRecJob:
    run: RunSpec = field(default_factory=RunSpec)  # where the run's artifacts live
    ray: RayConfig = field(default_factory=RayConfig)  # cluster address or embedded Ray settings
    data: DataConfig = field(default_factory=DataConfig)  # prepared first if missing
    model: SASRecConfig = field(default_factory=SASRecConfig)  # SASRec architecture
    train: SeqTrainConfig = field(default_factory=SeqTrainConfig)  # optimisation, workers, fault tolerance


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(TrainSASRecJob, argv)
    prepare_stage(cfg.run, cfg.data)
    with ray_session(cfg.ray):
        return sasrec_stage(cfg.run, cfg.model, cfg.train)


if __name__ == "__main__":
    main()
