"""The SASRec model: scores, training states and the next-item loss."""

import numpy as np
import pytest
import torch

from recalign.recsys.sasrec import SASRec, SASRecConfig, next_item_loss


def test_sasrec_scores_and_loss_shapes():
    model = SASRec(30, SASRecConfig(hidden_size=16, num_heads=2, max_len=5))
    history = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    assert model(history, torch.tensor([[1, 2, 3], [4, 5, 6]])).shape == (2, 3)
    states = model(history)
    assert states.shape == (2, 5, 16) and torch.isfinite(states).all()
    assert (states[0, :2] == 0).all(), "padding positions carry no state"
    loss = next_item_loss(states, model.item_emb.weight, torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 5, 6]]))
    assert loss.item() == pytest.approx(np.log(30), rel=0.2)  # near-uniform at init
