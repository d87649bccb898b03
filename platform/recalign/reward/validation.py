"""Does the knowledge help? KA-SASRec against plain SASRec on the validation split, with paired CIs.

Systems, all scored on the same validation rows (users that have sampled analyses):
- `ka_sasrec`: KA-SASRec fed the user's mean sample embedding (what early stopping used);
- `ka_sasrec_per_sample`: KA-SASRec fed each sample in turn, metrics averaged over the user's
  samples (the setting the rewards use: one analysis at a time);
- `ka_sasrec_no_knowledge`: the same weights fed no text (the knowledge-dropout path);
- `plain_sasrec`: SASRec trained by the same loop on the same windows without knowledge (the reference);
- `sasrec_baseline`: the pipeline's SASRec (trained on full train sequences, one more item per user).
Both KA-SASRec and the plain control selected their epoch on this split, so absolute numbers are
slightly optimistic for both; the paired difference is the honest quantity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recalign import metrics
from recalign.config import option
from recalign.data.dataset import Dataset
from recalign.recsys.ka_sasrec import KASASRec
from recalign.recsys.ka_train import score_with_knowledge
from recalign.recsys.knowledge import KnowledgeTable
from recalign.recsys.sasrec import SASRec
from recalign.recsys.train import score_split
from recalign.systems import EvalConfig, summarise


@dataclass
class CompareConfig:
    plain_control: bool = option(True, "also train plain SASRec with the same loop and windows: the fair reference")
    num_resamples: int = option(2000, "paired-bootstrap resamples")
    confidence: float = option(0.95, "interval coverage")
    seed: int = option(0, "bootstrap seed")

    def eval_config(self) -> EvalConfig:
        reference = "plain_sasrec" if self.plain_control else "ka_sasrec_no_knowledge"
        return EvalConfig(split="valid", reference=reference, num_resamples=self.num_resamples,
                          confidence=self.confidence, seed=self.seed)


def per_sample_metrics(model: KASASRec, history: np.ndarray, candidates: np.ndarray, target_index: np.ndarray,
                       vectors: np.ndarray, present: np.ndarray, names: tuple[str, ...],
                       batch_size: int = 512) -> dict[str, np.ndarray]:
    """Per row, metrics averaged over that row's present samples. vectors (B, N, d_k), present (B, N)."""
    sums = {name: np.zeros(len(history)) for name in names}
    counts = present.sum(axis=1)
    if np.any(counts == 0):
        raise ValueError("every row needs at least one sample")
    for j in range(present.shape[1]):
        rows = np.nonzero(present[:, j])[0]
        if not len(rows):
            continue
        scores = score_with_knowledge(model, history[rows], candidates[rows], vectors[rows, j],
                                      np.ones(len(rows), dtype=bool), batch_size)
        for name, values in metrics.compute(scores, target_index[rows], names).items():
            sums[name][rows] += values
    return {name: total / counts for name, total in sums.items()}


def compare_on_valid(data: Dataset, knowledge: KnowledgeTable, ka_model: KASASRec, plain_model: KASASRec | None,
                     cfg: EvalConfig, baseline: SASRec | None = None) -> dict:
    """Evaluation result (see `recalign.evaluation.summarise`) on validation users with knowledge."""
    valid = data.split("valid")
    rows = np.nonzero(knowledge.present.any(axis=1)[valid.user_idx])[0]
    if not len(rows):
        raise ValueError("no validation user has sampled analyses")
    split = valid.subset(rows)
    users = split.user_idx
    names = tuple(cfg.metrics)
    systems = {
        "ka_sasrec": metrics.compute(score_with_knowledge(ka_model, split.history, split.candidates,
                                                          knowledge.mean()[users], np.ones(len(users), dtype=bool)),
                                     split.target_index, names),
        "ka_sasrec_per_sample": per_sample_metrics(ka_model, split.history, split.candidates, split.target_index,
                                                   knowledge.vectors[users], knowledge.present[users], names),
        "ka_sasrec_no_knowledge": metrics.compute(score_with_knowledge(ka_model, split.history, split.candidates,
                                                                       None, None), split.target_index, names),
    }
    notes = {"ka_sasrec": "mean sample embedding", "ka_sasrec_per_sample": "one sample at a time, averaged",
             "ka_sasrec_no_knowledge": "same weights, no text"}
    if plain_model is not None:
        systems["plain_sasrec"] = metrics.compute(score_with_knowledge(plain_model, split.history, split.candidates,
                                                                       None, None), split.target_index, names)
        notes["plain_sasrec"] = "same loop and data, no knowledge"
    if baseline is not None:
        systems["sasrec_baseline"] = metrics.compute(score_split(baseline, split.history, split.candidates),
                                                     split.target_index, names)
        notes["sasrec_baseline"] = "pipeline SASRec, full train sequences"
    result = summarise(systems, cfg, rows={name: np.arange(len(split)) for name in systems}, notes=notes)
    result["num_valid_users"] = int(len(valid))
    result["num_users_with_knowledge"] = int(len(rows))
    return result
