"""The letter scorer on vLLM (`rerank.engine=vllm`) against the transformers one, on the tiny Llama with a
collaborative-token policy: ID-only and hybrid prompts go in as prompt embeddings, text prompts as token ids,
and both engines give the same letter logits and the same greedy answers."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from recalign.llm.policy import load_policy
from recalign.prompts import PromptConfig
from recalign.rerank.scorer import LetterScorer, RerankConfig, VLLMLetterScorer, build_prompts, scorer_class
from tests.helpers.collab import save_collab_adapter

pytest.importorskip("vllm")

ROWS = np.arange(4)
CFG = RerankConfig(batch_size=4, max_new_tokens=3, dtype="float32", engine="vllm", vllm_kv_cache_gb=0.25,
                   vllm_max_model_len=1024)


@pytest.fixture(scope="module")
def policy(tiny_llama_dir, ml100k_dir, tmp_path_factory):
    from recalign.data.dataset import Dataset

    data = Dataset(ml100k_dir)
    adapter = tmp_path_factory.mktemp("collab-policy")
    save_collab_adapter(tiny_llama_dir, data.num_items, adapter, seed=4)
    return data, functools.partial(load_policy, str(tiny_llama_dir), str(adapter), "float32")


@pytest.fixture(scope="module")
def scorers(policy):
    _, loader = policy
    return LetterScorer(loader, 20, CFG), scorer_class(CFG)(loader, 20, CFG)


@pytest.mark.parametrize("item_tokens", ["ids", "hybrid", "none"])
def test_vllm_and_transformers_give_the_same_letter_logits(policy, scorers, item_tokens):
    data, _ = policy
    torch_scorer, vllm_scorer = scorers
    assert isinstance(vllm_scorer, VLLMLetterScorer) and vllm_scorer.has_projector
    texts = build_prompts(data, "test", ROWS, torch_scorer.tokenizer,
                          PromptConfig(max_history=5, show_genres=False, item_tokens=item_tokens))
    batch = {"row": ROWS, "prompt": np.array(texts, dtype=object)}
    expected, got = torch_scorer(batch), vllm_scorer(batch)
    assert got["letter_logits"].shape == (len(ROWS), 20)
    np.testing.assert_allclose(got["letter_logits"], expected["letter_logits"], rtol=1e-4, atol=1e-4)
    assert (got["letter_logits"].argsort(1) == expected["letter_logits"].argsort(1)).all()
    assert list(got["answer"]) == list(expected["answer"]), "the same greedy answers"
    assert list(vllm_scorer(batch, generate=False)["answer"]) == [""] * len(ROWS)


def test_item_tokens_for_a_policy_without_a_projector_are_an_error(policy, scorers, monkeypatch):
    data, _ = policy
    _, vllm_scorer = scorers
    text, = build_prompts(data, "test", ROWS[:1], vllm_scorer.tokenizer, PromptConfig(max_history=3, item_tokens="ids"))
    monkeypatch.setattr(vllm_scorer, "collab", None)
    with pytest.raises(ValueError, match="no projector"):
        vllm_scorer({"row": ROWS[:1], "prompt": np.array([text], dtype=object)})
