"""Evaluate every system a run has on the protocol's test split; writes runs/<name>/eval/.

    python jobs/evaluate.py [jobs/configs/evaluate.yaml] [run.name=demo eval.llm_users=100 ...]

Baselines always; KA-SASRec once reward_model/ exists (fed the greedy analyses of the base LLM and of
each knowledge-path policy); the LLM re-ranker zero-shot and with each re-rank policy found under
policy/rerank/. Per-system results are cached, so a re-run scores only what is new.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch import RayConfig, parse_args, ray_session, run

from recalign.config import option
from recalign.evaluation.config import FinalEvalConfig
from recalign.evaluation.stage import evaluate_stage
from recalign.runs import RunSpec
from recalign.sampling.engines import EngineConfig


@dataclass
class EvaluateJob:
    run: RunSpec = option(factory=RunSpec, help="the run whose artifacts are evaluated")
    ray: RayConfig = option(factory=RayConfig, help="cluster address or embedded Ray settings")
    model: str = option("smollm2", "the run's base LLM: \"smollm2\", \"tiny\" or a local HF folder")
    models_dir: str = option("", "where named models are converted or built; empty: <run.root>/models when run.root "
                                 "is a URI or an absolute path (shared on a cluster), else ./models")
    eval: FinalEvalConfig = option(factory=FinalEvalConfig, help="split, subsets, metrics, re-ranker prompts")
    engine: EngineConfig = option(factory=EngineConfig, help="engine of the greedy analyses for KA-SASRec")


def main(argv: list[str] | None = None) -> dict:
    from recalign.llm import resolve_model

    cfg = parse_args(EvaluateJob, argv, __doc__)
    models_dir = cfg.run.models(cfg.models_dir)
    with ray_session(cfg.ray, storage={"run.root": cfg.run.root, "models_dir": models_dir}):
        summary = evaluate_stage(cfg.run, cfg.eval, resolve_model(cfg.model, models_dir), cfg.engine)
    print(summary["table"])
    return summary


if __name__ == "__main__":
    run(main)
