"""Prepare a dataset into the canonical Parquet layout under runs/<name>/data/.

    python jobs/prepare.py [jobs/configs/prepare.yaml] [data.source=table data.interactions=... data.items=...]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launch import parse_args

from recalign.data.stage import prepare_stage
from recalign.data.dataset import DataConfig
from recalign.runs import RunSpec


@dataclass
class PrepareJob:
    run: RunSpec = field(default_factory=RunSpec)  # where the run's artifacts live
    data: DataConfig = field(default_factory=DataConfig)  # source and protocol


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(PrepareJob, argv)
    return prepare_stage(cfg.run, cfg.data)


if __name__ == "__main__":
    main()
