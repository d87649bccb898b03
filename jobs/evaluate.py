"""Evaluate the run's systems on the protocol's test split; writes runs/<name>/eval/metrics.{json,md}.

    python jobs/evaluate.py [jobs/configs/evaluate.yaml] [run.name=demo eval.split=test ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launch import parse_args

from recalign.baselines import evaluate_baselines_stage
from recalign.evaluation import EvalConfig
from recalign.runs import RunSpec


@dataclass
class EvaluateJob:
    run: RunSpec = field(default_factory=RunSpec)  # the run whose artifacts are evaluated
    eval: EvalConfig = field(default_factory=EvalConfig)  # split, metrics, bootstrap


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(EvaluateJob, argv)
    summary = evaluate_baselines_stage(cfg.run, cfg.eval)
    print(summary["table"])
    return summary


if __name__ == "__main__":
    main()
