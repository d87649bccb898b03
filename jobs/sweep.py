"""Ray Tune sweep of the alignment stage (beta x negatives x loss type, grid or random, ASHA).

    python jobs/sweep.py [jobs/configs/sweep.yaml] [run.name=demo sweep.search=random sweep.num_samples=8 ...]

Needs the run's data/ and pairs/rerank.parquet (the pipeline's earlier stages). Re-running the same
command continues an interrupted sweep (Tuner.restore). Writes runs/<name>/sweep/: results.md,
results.csv, sweep.png and best.json, which the pipeline reads with `align_from_sweep=true`; each trial
is an MLflow run (by default in a file store in <run>/mlflow; see `tracking`). A failed trial is retried
from its last rung (`sweep.max_failures`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from launch import RayConfig, parse_args, ray_session, run

from recalign import io
from recalign.align.config import AlignConfig, SweepConfig
from recalign.align.sweep import TrialSpec, results_frame, run_sweep, validation_rows, write_results
from recalign.config import fingerprint, option, to_dict
from recalign.data.dataset import Dataset
from recalign.errors import MissingInputError
from recalign.llm.convert import resolve_model
from recalign.llm.store import local_model
from recalign.pairs.stage import rerank_prompt
from recalign.rerank.scorer import RerankConfig, build_prompts
from recalign.runs import RunSpec, learning_key
from recalign.tracking import TrackingConfig, mlflow_target


@dataclass
class SweepJob:
    run: RunSpec = option(factory=RunSpec, help="run whose data/ and pairs/ are used; results in <run>/sweep/")
    ray: RayConfig = option(factory=RayConfig, help="embedded Ray settings (RAY_ADDRESS joins a cluster)")
    model: str = option("smollm2", "base LLM: \"smollm2\" (converted default) or a local HF folder")
    models_dir: str = option("", "where named models are converted or built; empty: <run.root>/models when run.root "
                                 "is a URI or an absolute path (shared on a cluster), else ./models")
    pairs: str = option("rerank", "pairs/<pairs>.parquet the trials train on")
    init_adapter: str = option("", "adapter every trial starts from (and whose log-probs are the reference), relative "
                                   "to the run dir: policy/rerank/sft searches what the pipeline's SFT+<loss> "
                                   "policies do; '' = a fresh LoRA on the base model")
    align: AlignConfig = option(factory=AlignConfig, help="base alignment config (searched fields overridden)")
    rerank: RerankConfig = option(factory=RerankConfig, help="validation re-ranker prompts and scoring")
    sweep: SweepConfig = option(factory=SweepConfig, help="search space, ASHA, retries, validation users")
    tracking: TrackingConfig = option(factory=TrackingConfig, help="MLflow: one run per trial (its config, reports, "
                                                                   "trial folder and adapter); a continued sweep "
                                                                   "keeps the tracking it was started with")


def validation_inputs(cfg: SweepJob, model_path: str) -> tuple[list[str], np.ndarray, int]:
    """(prompts, target_index, num_candidates) of the seeded validation users the trials are scored on,
    rendered with the run's re-rank prompt: the one the trials' pairs were rendered with."""
    from transformers import AutoTokenizer

    data = Dataset(cfg.run.dir("data"))
    valid = data.split("valid")
    rows = validation_rows(len(valid), cfg.sweep.valid_users, cfg.sweep.seed)
    tokenizer = AutoTokenizer.from_pretrained(local_model(model_path))  # the prompts need no weights
    prompts = build_prompts(data, "valid", rows, tokenizer, rerank_prompt(cfg.run))
    return prompts, valid.target_index[rows], valid.candidates.shape[1]


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(SweepJob, argv, __doc__)
    models_dir = cfg.run.models(cfg.models_dir)
    model_path = resolve_model(cfg.model, models_dir)
    pairs_uri = cfg.run.dir("pairs", f"{cfg.pairs}.parquet")
    if not io.exists(pairs_uri):
        raise MissingInputError(f"{pairs_uri}: missing; run the pipeline's pairs stage first")
    prompts, target_index, num_candidates = validation_inputs(cfg, model_path)
    init_adapter = cfg.run.dir(*cfg.init_adapter.split("/")) if cfg.init_adapter else ""
    if init_adapter and not io.exists(io.join(init_adapter, "adapter_model.safetensors")):
        raise MissingInputError(f"{init_adapter}: no adapter; run the pipeline's align stage first or set "
                                "init_adapter=''")
    spec = TrialSpec(align=cfg.align, model_path=model_path, pairs_uris=[pairs_uri], prompts=prompts,
                     target_index=target_index, num_candidates=num_candidates,
                     rerank=cfg.rerank, rungs=cfg.sweep.rungs, out_root=cfg.run.dir("sweep", "trials"),
                     storage_path=cfg.run.dir("ray"), init_adapter=init_adapter,
                     item_table=cfg.run.dir("baselines", "sasrec") if rerank_prompt(cfg.run).item_tokens != "none"
                     else "")
    init_hash = hashlib.sha256(io.read_bytes(io.join(init_adapter, "adapter_model.safetensors"))).hexdigest() \
        if init_adapter else ""
    name = sweep_name(cfg, model_path, init_hash, hashlib.sha256(io.read_bytes(pairs_uri)).hexdigest())
    print(f"sweep {name}: {len(prompts)} validation users, results in {cfg.run.dir('sweep')}", flush=True)
    tracking = mlflow_target(cfg.tracking, cfg.run)
    with ray_session(cfg.ray, storage={"run.root": cfg.run.root, "models_dir": models_dir}):
        results = run_sweep(cfg.sweep, spec, storage_path=cfg.run.dir("ray"), name=name, tracking=tracking)
    out = write_results(results_frame(results), cfg.align, cfg.run.dir("sweep"))
    print(out["table"])
    print(f"best: {out['best']['align']['loss_type']} beta={out['best']['align']['beta']:.3g} "
          f"K={out['best']['align']['num_negatives']} ({out['best']['metric']} {out['best']['value']:.4f})")
    return out


def sweep_name(cfg: SweepJob, model_path: str, init_hash: str, pairs_hash: str) -> str:
    """The sweep's identity: what its trials learn and are scored on. Concurrency, workers and fault
    tolerance (trial retries, INFRA_KEYS) are left out, so changing them continues an interrupted sweep
    instead of starting anew (a restored sweep keeps the concurrency and retries it was started with:
    Tune stores its TuneConfig and RunConfig)."""
    sweep = {k: v for k, v in learning_key(cfg.sweep).items() if k != "max_concurrent"}
    align = learning_key(cfg.align)
    return "sweep-" + fingerprint({"sweep": sweep, "align": align, "init": init_hash, "rerank": cfg.rerank.key(),
                                   "prompt": to_dict(rerank_prompt(cfg.run)),
                                   "model": model_path, "pairs": pairs_hash})


if __name__ == "__main__":
    run(main)
