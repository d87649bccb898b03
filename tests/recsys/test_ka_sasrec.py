"""KA-SASRec: shapes, the gate, the no-knowledge path, knowledge dropout and the training windows."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.recsys import CANDIDATES, HISTORY, tiny_ka_model


def test_shapes():
    model = tiny_ka_model()
    knowledge = torch.randn(2, 8)
    assert model(HISTORY, None, knowledge, torch.tensor([True, True])).shape == (2, 6, 16)
    assert model(HISTORY, CANDIDATES, knowledge).shape == (2, 3)
    assert model.encode(HISTORY, knowledge).shape == (2, 16)
    with pytest.raises(ValueError, match="knowledge must be"):
        model(HISTORY, CANDIDATES, torch.randn(2, 5))


def test_no_knowledge_is_exactly_the_inner_sasrec():
    model = tiny_ka_model()
    plain = model.sasrec.score_candidates(model.sasrec.encode(HISTORY), CANDIDATES)
    assert torch.equal(model(HISTORY, CANDIDATES), plain)
    absent = model(HISTORY, CANDIDATES, torch.randn(2, 8), torch.tensor([False, False]))
    assert torch.allclose(absent, plain, atol=1e-6)
    with_text = model(HISTORY, CANDIDATES, torch.randn(2, 8), torch.tensor([True, False]))
    assert not torch.allclose(with_text[0], plain[0], atol=1e-4)  # row 0 reads its text
    assert torch.allclose(with_text[1], plain[1], atol=1e-6)  # row 1 was given none


def test_gate_arithmetic():
    model = tiny_ka_model()
    states = torch.randn(2, 16)
    knowledge = torch.randn(2, 8)
    k = model.adaptor(knowledge)
    with torch.no_grad():
        model.gate.weight.zero_()
        model.gate.bias.zero_()  # sigmoid(0) = 0.5 everywhere
    assert torch.allclose(model.fuse(states, knowledge, None), states + 0.5 * k, atol=1e-6)
    with torch.no_grad():
        model.gate.bias.fill_(-50.0)  # gate closed: the text is ignored
    assert torch.allclose(model.fuse(states, knowledge, None), states, atol=1e-6)
    # Sequence states get the same user-level vector at every position.
    with torch.no_grad():
        model.gate.bias.zero_()
    seq_states = torch.randn(2, 4, 16)
    assert torch.allclose(model.fuse(seq_states, knowledge, None), seq_states + 0.5 * k.unsqueeze(1), atol=1e-6)


def test_training_states_keep_padding_zero_and_backprop_reaches_the_adaptor():
    model = tiny_ka_model().train()
    states = model(HISTORY, None, torch.randn(2, 8), torch.tensor([True, True]))
    assert torch.equal(states[0, :2], torch.zeros(2, 16))  # padded positions stay zero
    states.sum().backward()
    assert model.adaptor[0].weight.grad.abs().sum() > 0 and model.gate.weight.grad.abs().sum() > 0


def test_a_per_position_mask_fuses_the_knowledge_only_where_it_is_known():
    model = tiny_ka_model()
    knowledge = torch.randn(2, 8)
    plain = model(HISTORY)
    where = torch.tensor([[False, False, False, True, True, True], [False, False, False, False, False, True]])
    fused = model(HISTORY, None, knowledge, where)
    assert torch.allclose(fused[~where], plain[~where], atol=1e-6), "positions before the cut-off are plain SASRec"
    assert not torch.allclose(fused[where], plain[where], atol=1e-4)
    with pytest.raises(ValueError, match="present must be"):
        model(HISTORY, None, knowledge, torch.ones(2, 5, dtype=torch.bool))


def test_catalogue_logp_is_a_distribution_over_the_items():
    model = tiny_ka_model()
    logp = model.catalogue_logp(HISTORY, torch.randn(2, 8))
    assert logp.shape == (2, 31) and torch.isinf(logp[:, 0]).all(), "padding is never an item"
    assert torch.allclose(logp[:, 1:].exp().sum(dim=1), torch.ones(2), atol=1e-5)
