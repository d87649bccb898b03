"""Train the SASRec baseline under Ray Train (DDP, checkpoint every epoch, early stopping).

    python jobs/train_sasrec.py [jobs/configs/train_sasrec.yaml] [train.num_workers=2 ...]
"""

from __future__ import annotations

from dataclasses import dataclass

from launch import RayConfig, parse_args, ray_session, run

from recalign.config import option
from recalign.data.dataset import DataConfig
from recalign.data.stage import prepare_stage
from recalign.recsys.sasrec import SASRecConfig
from recalign.recsys.stage import sasrec_stage
from recalign.recsys.train import SeqTrainConfig
from recalign.runs import RunSpec


@dataclass
class TrainSASRecJob:
    run: RunSpec = option(factory=RunSpec, help="where the run's artifacts live")
    ray: RayConfig = option(factory=RayConfig, help="cluster address or embedded Ray settings")
    data: DataConfig = option(factory=DataConfig, help="prepared first if missing")
    model: SASRecConfig = option(factory=SASRecConfig, help="SASRec architecture")
    train: SeqTrainConfig = option(factory=SeqTrainConfig, help="optimisation, workers, fault tolerance")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(TrainSASRecJob, argv, __doc__)
    with ray_session(cfg.ray, storage={"run.root": cfg.run.root}):
        prepare_stage(cfg.run, cfg.data)
        return sasrec_stage(cfg.run, cfg.model, cfg.train)


if __name__ == "__main__":
    run(main)
