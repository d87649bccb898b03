"""Ray Tune sweep of the alignment stage: beta x number of negatives x loss type, with ASHA.

Each trial trains a LoRA policy on the re-rank pairs with a TorchTrainer (recalign.align.trainer)
in rungs of one epoch; after each rung it scores the direct LLM re-ranker on a seeded subset of
*validation* users and reports validation NDCG@10, so ASHA can stop weak trials early. The trial
driver itself asks for {"CPU": 0}: its TorchTrainer's workers hold the CPUs (otherwise the
trials deadlock waiting for each other's CPUs). A failed trial is retried from its last rung; with a
tracking target every trial is an MLflow run (its config, reports, trial folder and adapter).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from recalign import io, metrics
from recalign.align.config import AlignConfig, SweepConfig
from recalign.errors import MissingInputError
from recalign.llm.policy import load_policy
from recalign.rerank.scorer import RerankConfig, scorer_class
from recalign.runs import Log
from recalign.tracking import RUN_TAG, MlflowTarget, trial_callback

METRIC = "valid_ndcg@10"


@dataclass
class TrialSpec:
    """What every trial needs besides its sampled hyperparameters."""

    align: AlignConfig  # base alignment config; loss_type, beta, num_negatives and epochs are overridden
    model_path: str
    pairs_uris: list[str]
    prompts: list[str]  # validation re-rank prompts
    target_index: np.ndarray  # (V,) target column of each validation prompt
    num_candidates: int
    rerank: RerankConfig
    rungs: int
    out_root: str  # adapters of trial t go to <out_root>/<trial id>
    storage_path: str  # Ray Train storage of the trials' TorchTrainers
    hooks: list = field(default_factory=list)  # per-step hooks passed to train_policy (fault injection in tests)
    init_adapter: str = ""  # LoRA adapter every trial starts from and is the reference (the SFT policy); "" = none
    scorer: Callable[[str], dict[str, float]] | None = None  # adapter dir -> metrics; None = the letter re-ranker
    item_table: str = ""  # SASRec folder of the prompts' collaborative tokens (recalign.llm.collab); "" = none


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    from ray import tune

    if cfg.search == "grid":
        return {"loss_type": tune.grid_search(cfg.loss_types), "beta": tune.grid_search(cfg.betas),
                "num_negatives": tune.grid_search(cfg.num_negatives)}
    if cfg.search == "random":
        low, high = cfg.beta_range
        return {"loss_type": tune.choice(cfg.loss_types), "beta": tune.loguniform(low, high),
                "num_negatives": tune.choice(cfg.num_negatives)}
    raise ValueError(f"sweep.search must be grid or random, got {cfg.search!r}")


def validation_rows(num_rows: int, num_users: int, seed: int) -> np.ndarray:
    """A seeded, sorted subset of split rows (all rows when num_users is 0 or too large)."""
    if num_users <= 0 or num_users >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=num_users, replace=False))


def letter_ranker_metrics(model_path: str, adapter: str | None, prompts: list[str], target_index: np.ndarray,
                          num_candidates: int, rerank: RerankConfig) -> dict[str, float]:
    """Mean metrics of the letter re-ranker with `adapter` on the prompts, scored in-process."""
    cfg = dataclasses.replace(rerank, max_new_tokens=1)  # only the answer-position logits are needed
    scorer = scorer_class(cfg)(functools.partial(load_policy, model_path, adapter, cfg.dtype), num_candidates, cfg)
    out = scorer({"row": np.arange(len(prompts)), "prompt": np.array(prompts, dtype=object)})
    # A copy: arrays a Tune trial gets through the object store are read-only, and torch warns on those.
    values = metrics.compute(out["letter_logits"], np.array(target_index), ("ndcg@10", "hr@1", "mrr"))
    return {f"valid_{k}": float(v.mean()) for k, v in values.items()}


def trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """One Tune trial: train rung by rung (the TorchTrainer resumes its own checkpoints), report after each.

    Each report carries a Tune checkpoint naming its rung, so a trial restored after an interruption
    starts at the next rung instead of re-scoring (and re-publishing) the ones it already reported.
    """
    import tempfile

    from ray import tune

    from recalign.align.trainer import train_policy

    trial_id = tune.get_context().get_trial_id()
    out_dir = io.join(spec.out_root, trial_id)
    for rung in range(_rungs_done(tune.get_checkpoint()) + 1, spec.rungs + 1):
        cfg = dataclasses.replace(spec.align, loss_type=config["loss_type"], beta=float(config["beta"]),
                                  num_negatives=int(config["num_negatives"]), num_train_epochs=rung, max_steps=0)
        summary = train_policy(cfg=cfg, model_path=spec.model_path, pairs_uris=spec.pairs_uris, out_dir=out_dir,
                               storage_path=spec.storage_path, name=f"sweep-{trial_id}", hooks=spec.hooks,
                               log=lambda _: None, init_adapter=spec.init_adapter, item_table=spec.item_table)
        scores = spec.scorer(out_dir) if spec.scorer else letter_ranker_metrics(
            spec.model_path, out_dir, spec.prompts, spec.target_index, spec.num_candidates, spec.rerank)
        final = summary.get("final", {})
        with tempfile.TemporaryDirectory() as ckpt_dir:
            io.write_json({"rung": rung}, io.join(ckpt_dir, "rung.json"))
            tune.report({**scores, "rung": rung, "steps": summary.get("steps", 0), "adapter": out_dir,
                         "train_loss": final.get("loss", float("nan")),
                         "reward_accuracy": final.get("reward_accuracy", float("nan"))},
                        checkpoint=tune.Checkpoint.from_directory(ckpt_dir))


def _rungs_done(checkpoint) -> int:
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as ckpt_dir:
        return int(io.read_json(io.join(ckpt_dir, "rung.json"))["rung"])


def run_sweep(cfg: SweepConfig, spec: TrialSpec, storage_path: str, name: str, log: Log = print,
              tracking: MlflowTarget | None = None):
    """Run (or, when `storage_path/name` holds an interrupted sweep, continue) the Tune sweep.

    A trial that fails is retried up to cfg.max_failures times in the same run, from its last reported
    rung. A continued sweep keeps its finished trials, resumes the errored and unfinished ones from their
    last reported rung, and keeps the search space, ASHA, retry and MLflow settings it was started with
    (Tune stores them with the sweep). `tracking`: one MLflow run per trial (recalign.tracking.trial_callback).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(tune.with_parameters(trial, spec=spec), {"CPU": 0, "memory": 1})
    path = io.join(storage_path, name)
    if tune.Tuner.can_restore(path):
        log(f"sweep {name}: restoring the sweep in {path} (finished trials are kept)")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, restart_errored=False)
    else:
        callbacks = [trial_callback(tracking, {RUN_TAG: name})] if tracking else []
        scheduler = ASHAScheduler(time_attr="rung", max_t=spec.rungs, grace_period=cfg.grace_period,
                                  reduction_factor=cfg.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=param_space(cfg),
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, num_samples=cfg.num_samples,
                                        max_concurrent_trials=cfg.max_concurrent,
                                        search_alg=None if cfg.search == "grid" else _seeded_search(cfg.seed)),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    return tuner.fit()


def _seeded_search(seed: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed)


def results_frame(results) -> pd.DataFrame:
    """One row per trial: its hyperparameters and its last reported validation metrics."""
    rows = []
    for result in results:
        m = result.metrics or {}
        cfg = result.config or {}
        rows.append({"trial": m.get("trial_id", ""), "loss_type": cfg.get("loss_type"), "beta": cfg.get("beta"),
                     "num_negatives": cfg.get("num_negatives"), "rungs": m.get("rung", 0),
                     METRIC: m.get(METRIC, float("nan")), "valid_hr@1": m.get("valid_hr@1", float("nan")),
                     "valid_mrr": m.get("valid_mrr", float("nan")), "train_loss": m.get("train_loss", float("nan")),
                     "reward_accuracy": m.get("reward_accuracy", float("nan")), "adapter": m.get("adapter", ""),
                     "error": str(result.error) if result.error else ""})
    return pd.DataFrame(rows).sort_values(METRIC, ascending=False, na_position="last").reset_index(drop=True)


def write_results(frame: pd.DataFrame, align: AlignConfig, out_dir: str) -> dict[str, Any]:
    """results.md, results.csv, sweep.png and best.json (the config the pipeline can load)."""
    table = _markdown(frame)
    io.write_text(table, io.join(out_dir, "results.md"))
    io.write_text(frame.to_csv(index=False), io.join(out_dir, "results.csv"))
    ok = frame[frame["error"] == ""].dropna(subset=[METRIC])
    if ok.empty:
        raise RuntimeError(f"no sweep trial finished; see {out_dir}/results.md")
    best = ok.iloc[0]
    best_align = dataclasses.replace(align, loss_type=str(best["loss_type"]), beta=float(best["beta"]),
                                     num_negatives=int(best["num_negatives"]))
    payload = {"metric": METRIC, "value": float(best[METRIC]), "trial": best["trial"], "adapter": best["adapter"],
               "align": dataclasses.asdict(best_align)}
    io.write_json(payload, io.join(out_dir, "best.json"))
    _plot(frame, io.join(out_dir, "sweep.png"))
    return {"table": table, "best": payload}


def _markdown(frame: pd.DataFrame) -> str:
    cols = ["loss_type", "beta", "num_negatives", "rungs", METRIC, "valid_hr@1", "valid_mrr", "train_loss",
            "reward_accuracy"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) and c != "beta" else str(row[c]) for c in cols]
        cells[1] = f"{row['beta']:.3g}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(frame: pd.DataFrame, uri: str) -> None:
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for loss_type, group in frame.groupby("loss_type"):
        for k, sub in group.groupby("num_negatives"):
            sub = sub.sort_values("beta")
            ax.plot(sub["beta"], sub[METRIC], marker="o", label=f"{loss_type}, K={k}")
    ax.set_xscale("log")
    ax.set_xlabel("beta")
    ax.set_ylabel("validation NDCG@10 (LLM re-ranker)")
    ax.set_title("Alignment sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    io.write_bytes(buffer.getvalue(), uri)


def load_best(sweep_dir: str) -> AlignConfig:
    """The best trial's alignment config, as saved by `write_results`."""
    from recalign.config import from_dict

    uri = io.join(sweep_dir, "best.json")
    if not io.exists(uri):
        raise MissingInputError(f"{uri}: no sweep result; run jobs/sweep.py first")
    return from_dict(AlignConfig, io.read_json(uri)["align"], source=uri)

