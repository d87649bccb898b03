"""The pairs stage: preference pairs of a run under `<run>/pairs/` (see `recalign.pairs.build`).

    samples/ + rewards/ + data/ -> pairs/knowledge.parquet   (best analysis vs the K worst)
    data/ + baselines/sasrec/   -> pairs/rerank.parquet      (the target's letter vs K negatives)
    data/                       -> pairs/rerank_sft.parquet  (sliding windows: the target's letter vs the C-1
                                                              others; when pairs.windows.per_user != 0)
                                   pairs/summary.json        (counts per path)
                                   pairs/config.json         (the config: the run's re-rank prompt)
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from recalign import io
from recalign.config import fingerprint, to_dict
from recalign.data.dataset import Dataset
from recalign.pairs.build import (PAIRS_SPLIT, PATHS, PairsConfig, knowledge_pairs, rerank_pairs, validate_pairs,
                                  window_pairs)
from recalign.prompts import PromptConfig
from recalign.runs import Log, RunSpec, input_key, run_stage
from recalign.sampling.stage import load_samples


def pairs_stage(run: RunSpec, cfg: PairsConfig, log: Log = print, force: bool = False) -> dict:
    """Write pairs/<path>.parquet for each configured path and pairs/summary.json."""
    from recalign.llm import resolve_model

    model_path = resolve_model(cfg.model, cfg.models_dir) if "rerank" in cfg.paths else ""
    hard = "rerank" in cfg.paths and cfg.negatives == "hard"
    key = fingerprint({
        "data": input_key(run.dir("data")), "cfg": to_dict(cfg), "model": model_path,
        "knowledge": [input_key(run.dir("samples")), input_key(run.dir("rewards"))] if "knowledge" in cfg.paths
        else None, "sasrec": input_key(run.dir("baselines", "sasrec")) if hard else None})
    out_dir = run.dir("pairs")

    def build() -> dict:
        summary: dict = {"num_negatives": cfg.num_negatives, "margin": cfg.margin}
        inputs = _RerankInputs(run, model_path)
        for path in PATHS:
            if path not in cfg.paths:
                io.delete(io.join(out_dir, f"{path}.parquet"))  # never leave a stale set beside fresh ones
                continue
            table, counts = _build_path(run, cfg, path, inputs)
            validate_pairs(table, f"pairs/{path}", cfg.margin if path == "knowledge" else None)
            io.write_parquet(table, io.join(out_dir, f"{path}.parquet"))
            summary[path] = counts
            log(f"[pairs] {path}: {counts['kept']} pairs of {counts['users']} users, K<={cfg.num_negatives} "
                + (f"({counts['dropped_margin']} users dropped: no analysis {cfg.margin:g} below their best; "
                   f"{counts['rows_with_fewer_than_k']} rows with fewer than K)" if path == "knowledge"
                   else f"({cfg.negatives} negatives)"))
        sft_set = io.join(out_dir, SFT_SET)
        if "rerank" in cfg.paths and cfg.windows.per_user != 0:
            table, counts = window_pairs(inputs.data, inputs.tokenizer, cfg)
            validate_pairs(table, f"pairs/{SFT_SET}")
            io.write_parquet(table, sft_set)
            summary["rerank_sft"] = counts
            log(f"[pairs] rerank SFT set: {counts['kept']} windows of {counts['users']} users, "
                f"{counts['candidates']} candidates each")
        else:
            io.delete(sft_set)
        io.write_json(summary, io.join(out_dir, "summary.json"))
        io.write_json({**to_dict(cfg), "model_path": model_path}, io.join(out_dir, "config.json"))
        return summary

    return run_stage("pairs", out_dir, key, build, log, force)


SFT_SET = "rerank_sft.parquet"


def sft_pairs(run: RunSpec) -> str:
    """The pairs the re-rank SFT policy trains on: the sliding-window set when the run has one, else the
    train examples' re-rank pairs."""
    uri = run.dir("pairs", SFT_SET)
    return uri if io.exists(uri) else run.dir("pairs", "rerank.parquet")


def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    from recalign.llm.store import local_model

    return AutoTokenizer.from_pretrained(local_model(model_path))


def rerank_prompt(run: RunSpec) -> PromptConfig:
    """The run's re-rank prompt: the one its re-rank pairs were rendered with (pairs/config.json), which the
    re-rank policies were trained on, and so the one evaluation, the sweep and Serve must prompt with. A run
    without a pairs stage (zero-shot only) gets the pairs config's default."""
    uri = run.dir("pairs", "config.json")
    if not io.exists(uri):
        return PairsConfig().prompt
    return PromptConfig(**io.read_json(uri)["prompt"])


class _RerankInputs:
    """The dataset and the policy's tokenizer, each loaded once for the re-rank pairs and the SFT set."""

    def __init__(self, run: RunSpec, model_path: str):
        self.run, self.model_path = run, model_path

    @functools.cached_property
    def data(self) -> Dataset:
        return Dataset(self.run.dir("data"))

    @functools.cached_property
    def tokenizer(self):
        return _tokenizer(self.model_path)


def _build_path(run: RunSpec, cfg: PairsConfig, path: str, inputs: _RerankInputs) -> tuple[pa.Table, dict]:
    if path == "knowledge":
        rewards = io.read_parquet(run.dir("rewards", "rewards.parquet"))
        return knowledge_pairs(load_samples(run.dir("samples"), PAIRS_SPLIT), rewards, cfg)
    from recalign.recsys.train import load_model, score_split

    data = inputs.data
    scores = None
    if cfg.negatives == "hard":
        split = data.split(PAIRS_SPLIT)
        scores = score_split(load_model(run.dir("baselines", "sasrec")), split.history, split.candidates)
    return rerank_pairs(data, inputs.tokenizer, cfg, np.asarray(scores) if scores is not None else None)
