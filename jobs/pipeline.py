"""The whole recalign pipeline as one Ray job, every stage in order, in one run dir.

    python jobs/pipeline.py preset=demo [key=value ...]
    python jobs/pipeline.py jobs/configs/pipeline/demo.yaml [key=value ...]

A stage is skipped when its output exists for the same config (and inputs), so re-running after a
crash continues where it stopped. `force=[sasrec]` reruns named stages.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from launch import RayConfig, parse_args, ray_session

from recalign.baselines import evaluate_baselines_stage, prepare_stage, sasrec_stage
from recalign.data.dataset import DataConfig
from recalign.evaluation import EvalConfig
from recalign.models.sasrec import SASRecConfig
from recalign.runs import RunSpec
from recalign.train.seqrec import SeqTrainConfig

PRESETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "pipeline")
STAGES = ("data", "sasrec", "evaluate")


@dataclass
class PipelineJob:
    run: RunSpec = field(default_factory=RunSpec)  # run dir: <root>/<name>
    ray: RayConfig = field(default_factory=RayConfig)  # cluster address or embedded Ray settings
    data: DataConfig = field(default_factory=DataConfig)  # dataset and protocol
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)  # SASRec architecture
    sasrec_train: SeqTrainConfig = field(default_factory=SeqTrainConfig)  # SASRec training under Ray Train
    eval: EvalConfig = field(default_factory=EvalConfig)  # final evaluation
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # stages to run, in pipeline order
    force: list[str] = field(default_factory=list)  # stages to rerun even if up to date


def parse(argv: list[str] | None) -> PipelineJob:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    presets = [a for a in argv if a.startswith("preset=")]
    if presets:
        name = presets[-1].partition("=")[2]
        path = os.path.join(PRESETS, f"{name}.yaml")
        if not os.path.isfile(path):
            raise SystemExit(f"config error: unknown preset {name!r}; have {sorted(p[:-5] for p in os.listdir(PRESETS))}")
        argv = [path] + [a for a in argv if not a.startswith("preset=")]
    return parse_args(PipelineJob, argv)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(argv)
    unknown = sorted((set(cfg.stages) | set(cfg.force)) - set(STAGES))
    if unknown:
        raise SystemExit(f"config error: unknown stage(s) {unknown}; stages are {list(STAGES)}")
    start = time.time()
    print(f"recalign pipeline: run dir {cfg.run.dir()}, stages {cfg.stages}", flush=True)
    summaries: dict = {}
    with ray_session(cfg.ray):
        if "data" in cfg.stages:
            summaries["data"] = prepare_stage(cfg.run, cfg.data)
        if "sasrec" in cfg.stages:
            summaries["sasrec"] = sasrec_stage(cfg.run, cfg.data, cfg.sasrec, cfg.sasrec_train,
                                               force="sasrec" in cfg.force)
        if "evaluate" in cfg.stages:
            summaries["evaluate"] = evaluate_baselines_stage(cfg.run, cfg.eval, force="evaluate" in cfg.force)
    print(f"\nresults ({cfg.run.dir('eval', 'metrics.md')}):\n")
    print(summaries.get("evaluate", {}).get("table", "(evaluate stage not run)"))
    print(f"pipeline finished in {time.time() - start:.0f}s")
    return summaries


if __name__ == "__main__":
    main()
