"""The sasrec stage: the SASRec baseline of a run under `<run>/baselines/sasrec/`, trained under Ray Train."""

from __future__ import annotations

import numpy as np

from recalign.config import fingerprint
from recalign.data.dataset import SplitArrays
from recalign.recsys.sasrec import SASRecConfig
from recalign.recsys.train import SASRecJobSpec, SeqTrainConfig, fit_sasrec, load_model, score_split
from recalign.runs import Log, RunSpec, fingerprint_of, learning_key, run_stage


def sasrec_key(run: RunSpec, model_cfg: SASRecConfig, train_cfg: SeqTrainConfig) -> str:
    return fingerprint({"data": fingerprint_of(run.dir("data")), "model": learning_key(model_cfg),
                        "train": learning_key(train_cfg)})


def sasrec_stage(run: RunSpec, model_cfg: SASRecConfig, train_cfg: SeqTrainConfig, log: Log = print,
                 force: bool = False) -> dict:
    """Train SASRec on the run's data under Ray Train; the best model goes to baselines/sasrec/."""
    key = sasrec_key(run, model_cfg, train_cfg)
    out_dir = run.dir("baselines", "sasrec")

    def train() -> dict:
        spec = SASRecJobSpec(run.dir("data"), model_cfg, train_cfg)
        report = fit_sasrec(spec, out_dir, storage_path=run.dir("ray"), run_name=f"sasrec-{key}")
        log(f"[sasrec] best epoch {report['best_epoch']}: valid NDCG@10 {report['best_valid_ndcg']:.4f} "
            f"({report['epochs_run']} epochs, {train_cfg.num_workers} workers)")
        return {"best_epoch": report["best_epoch"], "valid_ndcg@10": report["best_valid_ndcg"],
                "epochs_run": report["epochs_run"]}

    return run_stage("sasrec", out_dir, key, train, log, force)


def sasrec_scores(run: RunSpec, split: SplitArrays) -> np.ndarray:
    """(B, C) the run's SASRec scores of a split's candidates."""
    return score_split(load_model(run.dir("baselines", "sasrec")), split.history, split.candidates)
