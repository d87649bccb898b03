"""The seed spread of runs that differ only in `seed`: each system's value per run beside its CI.

    python jobs/pipeline.py preset=demo seed=1 run.name=demo-seed1      # and seed=2, run.name=demo-seed2
    python jobs/spread.py runs=[demo,demo-seed1,demo-seed2] out=runs/demo/eval/spread.md

A difference between systems smaller than the spread between seeds is not a finding. No Ray needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch import parse_args, run

from recalign import io
from recalign.config import ConfigError, option
from recalign.evaluation.spread import read_summaries, spread_table


@dataclass
class SpreadJob:
    root: str = option("runs", "where the runs live (a local folder or a pyarrow URI)")
    runs: list[str] = option(factory=list, help="run names under root, 2 or more, evaluated on the same users")
    metric: str = option("ndcg@10", "the metric compared")
    out: str = option("", "also write the table to this file; \"\" = print only")


def main(argv: list[str] | None = None) -> str:
    cfg = parse_args(SpreadJob, argv, __doc__)
    if len(cfg.runs) < 2:
        raise ConfigError("overrides: runs: name at least 2 runs, e.g. runs=[demo,demo-seed1]")
    table = spread_table(read_summaries({name: io.join(cfg.root, name) for name in cfg.runs}), cfg.metric)
    if cfg.out:
        io.write_text(table, cfg.out)
    print(table)
    return table


if __name__ == "__main__":
    run(main)
