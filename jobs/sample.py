"""Sample N preference analyses per user (RLRF4Rec stage 1) into runs/<name>/samples/.

    python jobs/sample.py [jobs/configs/sample.yaml] [sample.num_users=32 sample.num_samples=4 ...]

Prepares the canonical data if needed, converts the default model once, then runs the Ray Data
pipeline (prompt builder -> vLLM/transformers sampler actors). Re-running skips users already written.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch import RayConfig, parse_args, ray_session

from recalign.config import option
from recalign.data.dataset import DataConfig, prepare
from recalign.runs import RunSpec
from recalign.sampling.config import SampleConfig
from recalign.sampling.pipeline import run_sampling


@dataclass
class SampleJob:
    run: RunSpec = option(factory=RunSpec, help="writes runs/<name>/data and runs/<name>/samples")
    ray: RayConfig = option(factory=RayConfig, help="cluster address or embedded Ray settings")
    data: DataConfig = option(factory=DataConfig, help="dataset and protocol (prepared if missing)")
    sample: SampleConfig = option(factory=SampleConfig, help="model, N, engine, users, actors")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(SampleJob, argv)
    data_dir = cfg.run.dir("data")
    prepare(cfg.data, data_dir)
    with ray_session(cfg.ray):
        return run_sampling(cfg.sample, data_dir, cfg.run.dir("samples"), log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
