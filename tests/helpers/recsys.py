"""A tiny KA-SASRec and a two-row batch for the recommender tests; a random SASRec published into a run."""

from __future__ import annotations

import torch

from recalign.recsys.ka_sasrec import KAConfig, KASASRec
from recalign.recsys.sasrec import SASRecConfig

TINY_SASREC = SASRecConfig(hidden_size=16, num_layers=1, num_heads=2, dropout=0.0, max_len=6)
HISTORY = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]])  # (2, 6), left-padded
CANDIDATES = torch.tensor([[1, 2, 9], [10, 11, 12]])  # (2, 3)


def tiny_ka_model(seed: int = 0, knowledge_dim: int = 8) -> KASASRec:
    """A KA-SASRec over 30 items in eval mode, seeded."""
    torch.manual_seed(seed)
    return KASASRec(30, TINY_SASREC, KAConfig(adaptor_hidden=12, adaptor_dropout=0.0), knowledge_dim).eval()


def publish_random_sasrec(run, seed: int = 0) -> None:
    """A random SASRec over the run's items, published as the sasrec stage would (model.pt, config.json, marker)."""
    from recalign.data.dataset import Dataset
    from recalign.recsys.sasrec import SASRec
    from recalign.recsys.train import SASRecJobSpec, SeqTrainConfig, save_model
    from recalign.runs import run_stage

    data = Dataset(run.dir("data"))
    torch.manual_seed(seed)
    model = SASRec(data.num_items, SASRecConfig(hidden_size=8, num_layers=1, num_heads=1, max_len=8))
    out = run.dir("baselines", "sasrec")
    spec = SASRecJobSpec(run.dir("data"), model.cfg, SeqTrainConfig())
    run_stage("sasrec", out, "fake", lambda: save_model(model.state_dict(), spec, out, {}) or {}, lambda _: None)
