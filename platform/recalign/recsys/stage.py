"""The foundation stages: prepare the data, train SASRec; scores and reports of the baselines.

Each stage function reads and writes under a `RunSpec` and is skipped when its output exists for
the same fingerprint (see `recalign.stage`). Jobs and the pipeline call these functions.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from recalign import io, stage
from recalign.config import fingerprint, to_dict
from recalign.data.dataset import DataConfig, SplitArrays, prepare
from recalign.evaluation.summary import markdown_table
from recalign.recsys.sasrec import SASRecConfig
from recalign.runs import RunSpec
from recalign.recsys.train import SASRecJobSpec, SeqTrainConfig, fit_sasrec, load_model, score_split

Log = Callable[[str], None]


def data_key(data_cfg: DataConfig) -> str:
    return fingerprint(data_cfg)


def prepare_stage(run: RunSpec, data_cfg: DataConfig, log: Log = print, force: bool = False) -> dict:
    def build() -> dict:
        meta = prepare(data_cfg, run.dir("data"))
        log(f"[data] {meta['name']}: {meta['num_users']} users, {meta['num_items']} items, "
            f"{meta['num_interactions']} interactions ({meta['dropped_users']} users dropped)")
        return {k: v for k, v in meta.items() if k != "config"}

    return stage.run("data", run.dir("data"), data_key(data_cfg), build, log, force)


def sasrec_key(data_cfg: DataConfig, model_cfg: SASRecConfig, train_cfg: SeqTrainConfig) -> str:
    train = {k: v for k, v in to_dict(train_cfg).items() if k not in ("num_workers", "use_gpu", "cpus_per_worker",
                                                                      "max_failures", "checkpoints_to_keep")}
    return fingerprint({"data": data_key(data_cfg), "model": to_dict(model_cfg), "train": train})


def sasrec_stage(run: RunSpec, data_cfg: DataConfig, model_cfg: SASRecConfig, train_cfg: SeqTrainConfig,
                 log: Log = print, force: bool = False) -> dict:
    """Train SASRec under Ray Train; the best model goes to baselines/sasrec/."""
    key = sasrec_key(data_cfg, model_cfg, train_cfg)
    out_dir = run.dir("baselines", "sasrec")

    def train() -> dict:
        spec = SASRecJobSpec(run.dir("data"), model_cfg, train_cfg)
        report = fit_sasrec(spec, out_dir, storage_path=run.dir("ray"), run_name=f"sasrec-{key}")
        log(f"[sasrec] best epoch {report['best_epoch']}: valid NDCG@10 {report['best_valid_ndcg']:.4f} "
            f"({report['epochs_run']} epochs, {train_cfg.num_workers} workers)")
        return {"best_epoch": report["best_epoch"], "valid_ndcg@10": report["best_valid_ndcg"],
                "epochs_run": report["epochs_run"]}

    return stage.run("sasrec", out_dir, key, train, log, force)


def sasrec_scores(run: RunSpec, split: SplitArrays) -> np.ndarray:
    return score_split(load_model(run.dir("baselines", "sasrec")), split.history, split.candidates)


def write_report(result: dict, eval_dir: str, title: str, extra: str = "") -> str:
    """eval/metrics.json and eval/metrics.md (atomic); returns the markdown (table + `extra`)."""
    table = markdown_table(result) + extra
    io.write_json(result, io.join(eval_dir, "metrics.json"))
    io.write_text(f"# {title}\n\n{table}", io.join(eval_dir, "metrics.md"))
    return table
