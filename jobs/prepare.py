"""Prepare a dataset into the canonical Parquet layout under runs/<name>/data/.

    python jobs/prepare.py [jobs/configs/prepare.yaml] [data.source=table data.interactions=... data.items=...]
"""

from __future__ import annotations

from dataclasses import dataclass

from launch import parse_args, run

from recalign.config import option
from recalign.data.dataset import DataConfig
from recalign.data.stage import prepare_stage
from recalign.runs import RunSpec


@dataclass
class PrepareJob:
    run: RunSpec = option(factory=RunSpec, help="where the run's artifacts live")
    data: DataConfig = option(factory=DataConfig, help="source and protocol")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(PrepareJob, argv, __doc__)
    return prepare_stage(cfg.run, cfg.data)


if __name__ == "__main__":
    run(main)
