"""Sample preference analyses (RLRF4Rec stage 1) into runs/<name>/samples/<split>/: N per user of the
`train` history (rewarded), and the `cutoff` analyses the reward model is trained on.

    python jobs/sample.py [jobs/configs/sample.yaml] [sample.num_users=32 sample.num_samples=4 ...]

Prepares the canonical data if needed, converts the default model once, then runs the Ray Data
pipeline (prompt builder -> vLLM/transformers sampler actors). Re-running skips users already written.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch import RayConfig, parse_args, ray_session, run

from recalign.config import option
from recalign.data.dataset import DataConfig
from recalign.data.stage import prepare_stage
from recalign.runs import RunSpec
from recalign.sampling.config import SampleConfig
from recalign.sampling.stage import sample_stage


@dataclass
class SampleJob:
    run: RunSpec = option(factory=RunSpec, help="writes runs/<name>/data and runs/<name>/samples")
    ray: RayConfig = option(factory=RayConfig, help="cluster address or embedded Ray settings")
    data: DataConfig = option(factory=DataConfig, help="dataset and protocol (prepared if missing)")
    sample: SampleConfig = option(factory=SampleConfig, help="model, N, engine, users, actors")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(SampleJob, argv, __doc__)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    with ray_session(cfg.ray, storage={"run.root": cfg.run.root, "sample.models_dir": cfg.sample.models_dir}):
        prepare_stage(cfg.run, cfg.data, log)
        return sample_stage(cfg.run, cfg.sample, log)


if __name__ == "__main__":
    run(main)
