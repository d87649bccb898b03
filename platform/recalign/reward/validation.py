"""Does the knowledge help? KA-SASRec against its controls, on targets it never trained on, with paired CIs.

Two questions, both on the users with rewarded analyses (the `train` set, written one item before the
train target):
- `knowledge_gain`: on a held-out target (the train target, which the rewards score and the reward model
  never trained on; and the validation target), the log-probability of the target over the whole
  catalogue and its NDCG@10 among the candidates, fed the user's own analyses, fed another user's
  (a seeded derangement: every user gets someone else's), and fed none. Knowledge carries the user's
  preference only if own beats shuffled: a gain that any analysis gives is a generic bias.
- `compare_on_valid`: the systems table on the validation target: KA-SASRec with the mean analysis, one
  analysis at a time, another user's, none; the plain control trained by the same loop without
  knowledge; the pipeline's SASRec. Both KA-SASRec and the control chose their epoch on this split, so
  absolute numbers are slightly optimistic for both; the paired differences are the honest quantity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recalign import metrics
from recalign.config import option
from recalign.data.dataset import Dataset, SplitArrays
from recalign.recsys.ka_sasrec import KASASRec
from recalign.recsys.ka_train import catalogue_logp, score_with_knowledge
from recalign.recsys.knowledge import KnowledgeTable
from recalign.recsys.sasrec import SASRec
from recalign.recsys.train import score_split
from recalign.systems import EvalConfig, summarise


@dataclass
class CompareConfig:
    plain_control: bool = option(True, "also train plain SASRec with the same loop and windows: the fair reference")
    num_resamples: int = option(2000, "paired-bootstrap resamples")
    confidence: float = option(0.95, "interval coverage")
    seed: int = option(0, "bootstrap seed and the shuffle that gives each user another user's analyses")

    def eval_config(self) -> EvalConfig:
        reference = "plain_sasrec" if self.plain_control else "ka_sasrec_no_knowledge"
        return EvalConfig(split="valid", reference=reference, num_resamples=self.num_resamples,
                          confidence=self.confidence, seed=self.seed)


def derangement(n: int, seed: int) -> np.ndarray:
    """(n,) a seeded permutation with no fixed point (n >= 2): row i reads row perm[i] != i."""
    if n < 2:
        raise ValueError("a shuffled control needs at least 2 users with analyses")
    perm = np.random.default_rng(seed).permutation(n)
    while (fixed := np.nonzero(perm == np.arange(n))[0]).size:
        i = int(fixed[0])  # swapping a fixed point with its neighbour frees both: the count falls every time
        j = (i + 1) % n
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def per_sample(model: KASASRec, split: SplitArrays, vectors: np.ndarray, present: np.ndarray, names: tuple[str, ...],
               batch_size: int = 512) -> dict[str, np.ndarray]:
    """Per row: metrics and the catalogue log-probability of the target, averaged over the row's present samples.
    vectors (B, N, d_k), present (B, N). Keys: the metric names and "logp"."""
    sums = {name: np.zeros(len(split)) for name in (*names, "logp")}
    counts = present.sum(axis=1)
    if np.any(counts == 0):
        raise ValueError("every row needs at least one sample")
    for j in range(present.shape[1]):
        rows = np.nonzero(present[:, j])[0]
        if not len(rows):
            continue
        values = row_metrics(model, split.subset(rows), vectors[rows, j], names, batch_size)
        for name, v in values.items():
            sums[name][rows] += v
    return {name: total / counts for name, total in sums.items()}


def row_metrics(model: KASASRec, split: SplitArrays, knowledge: np.ndarray | None, names: tuple[str, ...],
                batch_size: int = 512) -> dict[str, np.ndarray]:
    """Per row: `names` among the candidates and "logp", the target's log-probability over the catalogue."""
    present = None if knowledge is None else np.ones(len(split), dtype=bool)
    scores = score_with_knowledge(model, split.history, split.candidates, knowledge, present, batch_size)
    out = metrics.compute(scores, split.target_index, names)
    out["logp"] = catalogue_logp(model, split.history, split.target, knowledge, batch_size)
    return out


def knowledge_gain(model: KASASRec, data: Dataset, rewarded: KnowledgeTable, split_name: str, cfg: CompareConfig,
                   names: tuple[str, ...] = ("ndcg@10",)) -> dict:
    """Own analyses vs another user's vs none on `split_name`'s target, for the users with rewarded analyses."""
    split = data.split(split_name)
    rows = np.nonzero(rewarded.present.any(axis=1)[split.user_idx])[0]
    split = split.subset(rows)
    users = split.user_idx
    other = users[derangement(len(users), cfg.seed)]
    own = per_sample(model, split, rewarded.vectors[users], rewarded.present[users], names)
    shuffled = per_sample(model, split, rewarded.vectors[other], rewarded.present[other], names)
    none = row_metrics(model, split, None, names)
    out: dict = {"split": split_name, "num_users": int(len(users))}
    for name in ("logp", *names):
        boot = dict(num_resamples=cfg.num_resamples, confidence=cfg.confidence, seed=cfg.seed)
        out[name] = {"own": float(own[name].mean()), "shuffled": float(shuffled[name].mean()),
                     "none": float(none[name].mean()),
                     "own_vs_none": metrics.paired_bootstrap(own[name], none[name], **boot),
                     "shuffled_vs_none": metrics.paired_bootstrap(shuffled[name], none[name], **boot),
                     "own_vs_shuffled": metrics.paired_bootstrap(own[name], shuffled[name], **boot)}
    return out


def compare_on_valid(data: Dataset, rewarded: KnowledgeTable, ka_model: KASASRec, plain_model: KASASRec | None,
                     cfg: CompareConfig, baseline: SASRec | None = None) -> dict:
    """Systems table (see `recalign.systems.summarise`) on the validation target of the users with rewarded analyses."""
    eval_cfg = cfg.eval_config()
    valid = data.split("valid")
    rows = np.nonzero(rewarded.present.any(axis=1)[valid.user_idx])[0]
    if not len(rows):
        raise ValueError("no validation user has sampled analyses")
    split = valid.subset(rows)
    users = split.user_idx
    names = tuple(eval_cfg.metrics)
    other = users[derangement(len(users), cfg.seed)] if len(users) > 1 else users
    drop_logp = lambda values: {k: v for k, v in values.items() if k != "logp"}  # noqa: E731
    systems = {
        "ka_sasrec": metrics.compute(score_with_knowledge(ka_model, split.history, split.candidates,
                                                          rewarded.mean()[users], np.ones(len(users), dtype=bool)),
                                     split.target_index, names),
        "ka_sasrec_per_sample": drop_logp(per_sample(ka_model, split, rewarded.vectors[users],
                                                     rewarded.present[users], names)),
        "ka_sasrec_shuffled": drop_logp(per_sample(ka_model, split, rewarded.vectors[other], rewarded.present[other],
                                                   names)),
        "ka_sasrec_no_knowledge": metrics.compute(score_with_knowledge(ka_model, split.history, split.candidates,
                                                                       None, None), split.target_index, names),
    }
    notes = {"ka_sasrec": "mean analysis", "ka_sasrec_per_sample": "one analysis at a time, averaged",
             "ka_sasrec_shuffled": "another user's analyses", "ka_sasrec_no_knowledge": "same weights, no text"}
    if plain_model is not None:
        systems["plain_sasrec"] = metrics.compute(score_with_knowledge(plain_model, split.history, split.candidates,
                                                                       None, None), split.target_index, names)
        notes["plain_sasrec"] = "same loop and data, no knowledge"
    if baseline is not None:
        systems["sasrec_baseline"] = metrics.compute(score_split(baseline, split.history, split.candidates),
                                                     split.target_index, names)
        notes["sasrec_baseline"] = "pipeline SASRec, full train sequences"
    result = summarise(systems, eval_cfg, rows={name: np.arange(len(split)) for name in systems}, notes=notes)
    result["num_valid_users"] = int(len(valid))
    result["num_users_with_knowledge"] = int(len(rows))
    return result
