"""The whole recalign pipeline as one Ray job, every stage in order, in one run dir.

    python jobs/pipeline.py preset=demo [key=value ...]          # smoke | demo | full | ml1m
    python jobs/pipeline.py jobs/configs/pipeline/demo.yaml [key=value ...]

Stages (runs/<name>/...):
    data          canonical dataset and protocol                         data/
    sasrec        SASRec baseline under Ray Train                        baselines/sasrec/
    sample        N preference analyses per user (Ray Data + vLLM)       samples/
    embeddings    all-MiniLM-L6-v2 embeddings of the analyses            embeddings/
    reward_model  KA-SASRec (+ plain control) under Ray Train            reward_model/
    rewards       every analysis scored on the user's train target       rewards/
    pairs         knowledge and re-rank preference pairs                 pairs/
    align         LoRA policies: SFT, DPO, DMPO, S-DPO per path          policy/<path>/<label>/
    evaluate      every system on the test split, CIs vs SASRec, plots   eval/

A stage is skipped when its output exists for the same config (and inputs), so re-running after a
crash continues where it stopped. `force=[sasrec]` reruns named stages. `model` names the LLM for
every stage. A stage reads what it depends on from the run: evaluation prompts the knowledge policies
with the prompt the samples were written for (`sample.prompt`) and the re-ranker with the prompt the
re-rank pairs were rendered with (`pairs.prompt`), exactly as the standalone jobs do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass

from launch import RayConfig, console_to_log, parse_args, ray_session, run, verbose_flag

from recalign.align.config import PoliciesConfig
from recalign.align.stage import policies_stage
from recalign.config import ConfigError, option
from recalign.data.dataset import DataConfig
from recalign.data.stage import prepare_stage
from recalign.evaluation.config import FinalEvalConfig
from recalign.evaluation.stage import evaluate_stage
from recalign.pairs.build import PairsConfig
from recalign.pairs.stage import pairs_stage
from recalign.recsys.ka_sasrec import KAConfig
from recalign.recsys.sasrec import SASRecConfig
from recalign.recsys.stage import sasrec_stage
from recalign.recsys.train import SeqTrainConfig
from recalign.reward.encoder import EncoderConfig
from recalign.reward.rewards import RewardConfig
from recalign.reward.stage import embeddings_stage, reward_model_stage, rewards_stage
from recalign.reward.validation import CompareConfig
from recalign.runs import RunSpec, dry_running, stage_events, tell_stage
from recalign.sampling.config import SampleConfig
from recalign.sampling.stage import sample_stage
from recalign.tracking import TrackingConfig, mlflow_target

LOG_FILE = "pipeline.log"  # <run>/pipeline.log: everything the console does not show
PRESETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "pipeline")
STAGES = ("data", "sasrec", "sample", "embeddings", "reward_model", "rewards", "pairs", "align", "evaluate")
# What each stage reads from the run: a stage whose input reruns reruns too (the dry run's "why").
DEPENDS = {"data": (), "sasrec": ("data",), "sample": ("data",), "embeddings": ("sample",),
           "reward_model": ("data", "embeddings"), "rewards": ("reward_model", "embeddings"),
           "pairs": ("data", "sample", "rewards"), "align": ("pairs",),
           "evaluate": ("data", "sasrec", "sample", "reward_model", "align")}


@dataclass
class PipelineJob:
    run: RunSpec = option(factory=RunSpec, help="run dir: <root>/<name>")
    ray: RayConfig = option(factory=RayConfig, help="cluster address or embedded Ray settings")
    model: str = option("smollm2", "the LLM of every stage: \"smollm2\", \"tiny\" (smoke runs) or a local HF folder")
    models_dir: str = option("", "where named models are converted or built; empty: <run.root>/models when run.root "
                                 "is a URI or an absolute path (shared on a cluster), else ./models")
    data: DataConfig = option(factory=DataConfig, help="dataset and protocol")
    sasrec: SASRecConfig = option(factory=SASRecConfig, help="SASRec architecture (baseline and KA-SASRec)")
    sasrec_train: SeqTrainConfig = option(factory=SeqTrainConfig, help="SASRec baseline training")
    sample: SampleConfig = option(factory=SampleConfig, help="N analyses per user; its model is `model`")
    encoder: EncoderConfig = option(factory=EncoderConfig, help="text encoder of the analyses")
    ka: KAConfig = option(factory=KAConfig, help="knowledge adaptor of the reward model")
    ka_train: SeqTrainConfig = option(factory=SeqTrainConfig, help="reward model training")
    compare: CompareConfig = option(factory=CompareConfig, help="KA-SASRec vs SASRec on validation")
    reward: RewardConfig = option(factory=RewardConfig, help="reward = NDCG@10 + tie-break")
    pairs: PairsConfig = option(factory=PairsConfig, help="K negatives, margin, hard/random negatives")
    policies: PoliciesConfig = option(factory=PoliciesConfig, help="which policies, LoRA and training")
    eval: FinalEvalConfig = option(factory=FinalEvalConfig, help="test-split evaluation of every system")
    tracking: TrackingConfig = option(factory=TrackingConfig, help="MLflow: each policy's params, step metrics, "
                                                                   "adapter and metrics.json (beside TensorBoard)")
    seed: int = option(0, "run seed, added to every seed of what is learned or sampled (sasrec_train, sample, "
                          "ka_train, policies): seed=1, 2 redraw the models and analyses on the same protocol, "
                          "user subsets and test users, which shows the spread a rerun has")
    stages: list[str] = option(factory=lambda: list(STAGES), help="stages to run, in pipeline order")
    force: list[str] = option(factory=list, help="stages to rerun even if up to date")
    dry_run: bool = option(False, "list each stage as \"run\" or \"skip (up to date)\" with the reason, then exit: "
                                  "nothing is computed or written and Ray is not started")


def parse(argv: list[str] | None) -> PipelineJob:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    presets = [a for a in argv if a.startswith("preset=")]
    if presets:
        name = presets[-1].partition("=")[2]
        path = os.path.join(PRESETS, f"{name}.yaml")
        if not os.path.isfile(path):
            raise ConfigError(f"preset={name}: unknown preset; have {sorted(p[:-5] for p in os.listdir(PRESETS))}")
        argv = [path] + [a for a in argv if not a.startswith("preset=")]
    return parse_args(PipelineJob, argv, __doc__, resolve=resolve)


def resolve(cfg: PipelineJob) -> PipelineJob:
    """The config every stage runs with: stage names checked, one LLM for every stage, the run seed applied."""
    unknown = sorted((set(cfg.stages) | set(cfg.force)) - set(STAGES))
    if unknown:
        raise ConfigError(f"stages/force: unknown stage(s) {unknown}; stages are {list(STAGES)}")
    cfg.models_dir = cfg.run.models(cfg.models_dir)
    # One LLM for every stage. The prompts need no copying: later stages read them from the run (the knowledge
    # prompt from samples/, the re-rank prompt from pairs/), as the standalone jobs do.
    cfg.sample = dataclasses.replace(cfg.sample, model=cfg.model, models_dir=cfg.models_dir)
    cfg.pairs = dataclasses.replace(cfg.pairs, model=cfg.model, models_dir=cfg.models_dir)
    if cfg.seed:
        cfg = with_run_seed(cfg)
    return cfg


def with_run_seed(cfg: PipelineJob) -> PipelineJob:
    """cfg with `seed` added to the seeds of every learned or sampled part; the protocol (candidates), the
    user subsets, the bootstrap and the evaluation subset keep theirs, so seeds compare on the same rows."""
    def shifted(part):
        return dataclasses.replace(part, seed=part.seed + cfg.seed)

    policies = dataclasses.replace(cfg.policies, rerank=shifted(cfg.policies.rerank),
                                   knowledge=shifted(cfg.policies.knowledge))
    return dataclasses.replace(cfg, sasrec_train=shifted(cfg.sasrec_train), sample=shifted(cfg.sample),
                               ka_train=shifted(cfg.ka_train), policies=policies)


def run_stages(cfg: PipelineJob, log) -> dict:
    from recalign.llm import resolve_model

    run, todo, force = cfg.run, cfg.stages, set(cfg.force)
    out: dict = {}
    if "data" in todo:
        out["data"] = prepare_stage(run, cfg.data, log, "data" in force)
    if "sasrec" in todo:
        out["sasrec"] = sasrec_stage(run, cfg.sasrec, cfg.sasrec_train, log, "sasrec" in force)
    if "sample" in todo:
        out["sample"] = sample_stage(run, cfg.sample, log, "sample" in force)
    if "embeddings" in todo:
        out["embeddings"] = embeddings_stage(run, cfg.encoder, log, "embeddings" in force)
    if "reward_model" in todo:
        out["reward_model"] = reward_model_stage(run, cfg.sasrec, cfg.ka, cfg.ka_train, cfg.compare, log,
                                                 "reward_model" in force)
    if "rewards" in todo:
        out["rewards"] = rewards_stage(run, cfg.reward, log, "rewards" in force)
    if "pairs" in todo:
        out["pairs"] = pairs_stage(run, cfg.pairs, log, "pairs" in force)
    model_path = resolve_model(cfg.model, cfg.models_dir) if {"align", "evaluate"} & set(todo) else ""
    if "align" in todo:
        out["align"] = policies_stage(run, cfg.policies, model_path, log, "align" in force,
                                      tracking=mlflow_target(cfg.tracking, run, log) if not dry_running() else None)
    if "evaluate" in todo:  # always runs (its systems are cached one by one), so it tells its own events
        tell_stage("evaluate", "running")
        began = time.time()
        out["evaluate"] = evaluate_stage(run, cfg.eval, model_path, cfg.sample.engine, log)
        tell_stage("evaluate", "done", time.time() - began)
    return out


def plan(cfg: PipelineJob) -> list[tuple[str, str, str]]:
    """(stage, "run" | "skip (up to date)", why) for each stage of `cfg.stages`, computing and writing nothing."""
    from recalign.errors import MissingInputError
    from recalign.llm import ModelError
    from recalign.runs import WouldRun, dry_run

    rows, reruns = [], set()
    with dry_run():
        for stage in cfg.stages:
            after = [d for d in DEPENDS[stage] if d in reruns]
            if stage in cfg.force:
                verdict = ("run", "forced (force=[...])")
            elif after:
                verdict = ("run", f"its input {', '.join(after)} reruns")
            elif stage == "evaluate":
                verdict = ("run", "always: rescores the systems whose inputs changed (the rest are cached) and "
                                  "rewrites eval/")
            else:
                try:
                    run_stages(dataclasses.replace(cfg, stages=[stage], force=[]), lambda message: None)
                    verdict = ("skip (up to date)", "same config and inputs as its finished output")
                except WouldRun as would:
                    verdict = ("run", f"{would.stage}: {would.reason}" if would.stage != stage else would.reason)
                except (MissingInputError, ModelError) as err:
                    verdict = ("run", f"an input is not there yet: {err}")
            if verdict[0] == "run":
                reruns.add(stage)
            rows.append((stage, *verdict))
    return rows


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(argv)
    if cfg.dry_run:
        rows = plan(cfg)
        width = max(len(stage) for stage, _, _ in rows)
        print(f"dry run of {cfg.run.dir()} (nothing computed or written):")
        for stage, verdict, why in rows:
            print(f"  {stage:<{width}}  {verdict:<17}  {why}")
        return {"plan": rows}
    start = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {message}", flush=True)

    log_uri, verbose = cfg.run.dir(LOG_FILE), verbose_flag(argv)
    with console_to_log(log_uri, verbose) as say:
        def on_stage(stage: str, event: str, seconds: float) -> None:
            clock = f"[{time.time() - start:6.0f}s]"
            if event == "running":
                say(f"{clock} {stage:<20} running...", live=True)
            else:
                say(f"{clock} {stage:<20} " + ("up to date, skipped" if event == "skipped" else
                                               f"done in {seconds:.0f}s"))

        say(f"recalign pipeline: run dir {cfg.run.dir()}, model {cfg.model}" + (
            "" if verbose else f" (the full log: {log_uri}; verbose=true shows it here)"))
        events = contextlib.nullcontext() if verbose else stage_events(on_stage)  # verbose: the stages' own lines
        storage = {"run.root": cfg.run.root, "models_dir": cfg.models_dir}
        with events, ray_session(cfg.ray, storage=storage):
            summaries = run_stages(cfg, log)
        say(f"\nresults ({cfg.run.dir('eval', 'metrics.md')}, plots in {cfg.run.dir('eval', 'metrics.png')}):\n")
        say(summaries.get("evaluate", {}).get("table", "(evaluate stage not run)"))
        say(f"pipeline finished in {time.time() - start:.0f}s")
    return summaries


if __name__ == "__main__":
    run(main)
