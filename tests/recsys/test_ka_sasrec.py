"""KA-SASRec: shapes, the gate, the no-knowledge path, knowledge dropout and the training windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recalign.recsys.ka_sasrec import KAConfig, KASASRec
from recalign.recsys.ka_train import batch_knowledge, knowledge_windows, pick_samples, score_with_knowledge
from recalign.recsys.knowledge import KnowledgeTable
from recalign.recsys.sasrec import SASRecConfig

CFG = SASRecConfig(hidden_size=16, num_layers=1, num_heads=2, dropout=0.0, max_len=6)


def _model(seed: int = 0, knowledge_dim: int = 8) -> KASASRec:
    torch.manual_seed(seed)
    return KASASRec(30, CFG, KAConfig(adaptor_hidden=12, adaptor_dropout=0.0), knowledge_dim).eval()


HISTORY = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]])
CANDIDATES = torch.tensor([[1, 2, 9], [10, 11, 12]])


def test_shapes():
    model = _model()
    knowledge = torch.randn(2, 8)
    assert model(HISTORY, None, knowledge, torch.tensor([True, True])).shape == (2, 6, 16)
    assert model(HISTORY, CANDIDATES, knowledge).shape == (2, 3)
    assert model.encode(HISTORY, knowledge).shape == (2, 16)
    with pytest.raises(ValueError, match="knowledge must be"):
        model(HISTORY, CANDIDATES, torch.randn(2, 5))


def test_no_knowledge_is_exactly_the_inner_sasrec():
    model = _model()
    plain = model.sasrec.score_candidates(model.sasrec.encode(HISTORY), CANDIDATES)
    assert torch.equal(model(HISTORY, CANDIDATES), plain)
    absent = model(HISTORY, CANDIDATES, torch.randn(2, 8), torch.tensor([False, False]))
    assert torch.allclose(absent, plain, atol=1e-6)
    with_text = model(HISTORY, CANDIDATES, torch.randn(2, 8), torch.tensor([True, False]))
    assert not torch.allclose(with_text[0], plain[0], atol=1e-4)  # row 0 reads its text
    assert torch.allclose(with_text[1], plain[1], atol=1e-6)  # row 1 was given none


def test_gate_arithmetic():
    model = _model()
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
    model = _model().train()
    states = model(HISTORY, None, torch.randn(2, 8), torch.tensor([True, True]))
    assert torch.equal(states[0, :2], torch.zeros(2, 16))  # padded positions stay zero
    states.sum().backward()
    assert model.adaptor[0].weight.grad.abs().sum() > 0 and model.gate.weight.grad.abs().sum() > 0


def test_knowledge_windows_hold_out_each_users_last_train_item():
    sequences = [np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([7, 8, 9, 10, 11, 12, 13, 14])]
    inputs, targets, owners = knowledge_windows(sequences, max_len=3)
    # User 0 trains on [1, 2, 3]: inputs (0, 1, 2) -> targets (0, 2, 3); user 1 ([5]) has nothing left.
    assert inputs[owners == 0].tolist() == [[0, 1, 2]] and targets[owners == 0].tolist() == [[0, 2, 3]]
    assert not (owners == 1).any()
    user2 = set(inputs[owners == 2].flatten().tolist()) | set(targets[owners == 2].flatten().tolist())
    assert user2 - {0} == {7, 8, 9, 10, 11, 12, 13}  # 14, the reward target, is never seen
    for user, seq in enumerate(sequences):
        held_out = int(seq[-1])
        assert not (targets[owners == user] == held_out).any() and not (inputs[owners == user] == held_out).any()


def test_pick_samples_draws_present_samples_per_epoch_and_same_on_every_worker():
    present = np.array([[True, True, True], [False, False, False], [False, True, False]])
    picks = {e: pick_samples(present, seed=3, epoch=e) for e in range(20)}
    assert all(p[1] == -1 and p[2] == 1 for p in picks.values())
    assert {int(p[0]) for p in picks.values()} == {0, 1, 2}  # varies over epochs
    assert np.array_equal(pick_samples(present, 3, 5), picks[5])  # deterministic: all workers agree


def test_batch_knowledge_and_dropout():
    vectors = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    table = KnowledgeTable(vectors, np.array([[True, True], [False, False], [True, False]]))
    picks = np.array([1, -1, 0])
    owners = torch.tensor([0, 1, 2, 0])
    k, present = batch_knowledge(table, picks, owners, dropout=0.0)
    assert present.tolist() == [True, False, True, True]
    assert k[0].tolist() == vectors[0, 1].tolist() and k[2].tolist() == vectors[2, 0].tolist()
    _, dropped = batch_knowledge(table, picks, owners, dropout=1.0)
    assert not dropped.any()
    _, half = batch_knowledge(table, np.zeros(3, dtype=np.int64), torch.zeros(4000, dtype=torch.long), 0.3,
                              torch.Generator().manual_seed(0))
    assert 0.65 < half.float().mean().item() < 0.75


def test_score_with_knowledge_matches_forward_in_batches():
    model = _model()
    history, candidates = HISTORY.numpy(), CANDIDATES.numpy()
    knowledge = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    present = np.array([True, False])
    scores = score_with_knowledge(model, history, candidates, knowledge, present, batch_size=1)
    expected = model(HISTORY, CANDIDATES, torch.from_numpy(knowledge), torch.from_numpy(present))
    assert scores.shape == (2, 3) and np.allclose(scores, expected.detach().numpy(), atol=1e-5)
