"""The direct LLM re-ranker: letter logits at the answer position, free-generation metrics."""

import functools

import numpy as np
import pytest
import torch

from recalign.llm.policy import load_policy
from recalign.prompts import PromptConfig
from recalign.rerank import scorer as rerank

PROMPT = PromptConfig(max_history=10, show_genres=False)


def test_letter_ids_are_single_distinct_tokens(tiny_llama_dir):
    _, tok = load_policy(str(tiny_llama_dir))
    ids = rerank.letter_token_ids(tok, 20)
    assert len(set(ids)) == 20
    assert tok.decode([ids[2]]) == "C"


def test_scorer_matches_a_manual_forward(tiny_llama_dir, ml100k_dir):
    from recalign.data.dataset import Dataset

    cfg = rerank.RerankConfig(batch_size=2, max_new_tokens=3)
    loader = functools.partial(load_policy, str(tiny_llama_dir))
    model, tok = loader()
    data = Dataset(ml100k_dir)
    texts = rerank.build_prompts(data, "test", np.array([0, 1, 2]), tok, PROMPT)
    assert all("labelled A to T" in t for t in texts)
    scorer = rerank.LetterScorer(loader, 20, cfg)
    out = scorer({"row": np.array([0, 1, 2]), "prompt": np.array(texts, dtype=object)})
    assert out["letter_logits"].shape == (3, 20) and len(out["answer"]) == 3
    ids = rerank.letter_token_ids(tok, 20)
    for i, text in enumerate(texts):  # unpadded single-prompt forward: the batch padding must not matter
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            last = model(**enc).logits[0, -1]
        np.testing.assert_allclose(out["letter_logits"][i], last[ids].numpy(), rtol=1e-4, atol=1e-4)


def test_bfloat16_scorer_computes_letter_logits_in_float32(tiny_llama_dir, ml100k_dir):
    """A bfloat16 model's letter logits come from its final hidden state times the letter rows of the
    LM head in float32, not rounded to bfloat16 (whose coarse steps would tie candidates)."""
    from recalign.data.dataset import Dataset

    cfg = rerank.RerankConfig(batch_size=2, max_new_tokens=2, dtype="bfloat16")
    loader = functools.partial(load_policy, str(tiny_llama_dir), None, "bfloat16")
    model, tok = loader()
    texts = rerank.build_prompts(Dataset(ml100k_dir), "test", np.array([0, 1]), tok, PROMPT)
    out = rerank.LetterScorer(loader, 20, cfg)({"row": np.array([0, 1]), "prompt": np.array(texts, dtype=object)})
    ids = rerank.letter_token_ids(tok, 20)
    head = model.get_output_embeddings().weight[ids].float()
    for i, text in enumerate(texts):
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1][0, -1]
            expected = (hidden.float() @ head.T).numpy()
            rounded = model(**enc).logits[0, -1, ids].float().numpy()
        np.testing.assert_allclose(out["letter_logits"][i], expected, rtol=1e-2, atol=1e-2)
        assert np.abs(out["letter_logits"][i] - rounded).max() < 0.1  # the same ranking signal ...
    as_bf16 = torch.tensor(out["letter_logits"]).bfloat16().float().numpy()
    assert (as_bf16 != out["letter_logits"]).any()  # ... at float32 resolution


def test_free_generation_metrics_by_hand():
    answers = ["B. Heat", "hmm", "A) Toy Story", "C"]
    target = np.array([1, 0, 1, 2])
    m = rerank.free_generation_metrics(answers, target, 3)
    assert m["valid_ratio"] == pytest.approx(0.75)
    assert m["hr@1_all_rows"] == pytest.approx(0.5)  # rows 0 and 3 hit
    assert m["hr@1_valid_rows"] == pytest.approx(2 / 3)
    none = rerank.free_generation_metrics(["I would pick B", "hmm"], np.array([1, 0]), 3)
    assert none["valid_ratio"] == 0.0 and none["hr@1_all_rows"] == 0.0
    assert np.isnan(none["hr@1_valid_rows"]), "undefined without a valid answer: NaN, shown as '-', not 0"


@pytest.mark.ray
@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.slow)])
def test_score_rows_on_ray_data(ray_local, tiny_llama_dir, ml100k_dir, engine):
    """Scored by Ray Data actors on either engine, the logits are those of the transformers scorer in-process."""
    from recalign.data.dataset import Dataset

    if engine == "vllm":
        pytest.importorskip("vllm")
    cfg = rerank.RerankConfig(batch_size=2, max_new_tokens=2, engine=engine, vllm_kv_cache_gb=0.25,
                              vllm_max_model_len=1024)
    loader = functools.partial(load_policy, str(tiny_llama_dir))
    _, tok = loader()
    texts = rerank.build_prompts(Dataset(ml100k_dir), "test", np.arange(5), tok, PROMPT)
    logits, answers = rerank.score_rows_with_ray(dict(enumerate(texts)), loader, 20, cfg)
    assert sorted(logits) == [0, 1, 2, 3, 4] and all(v.shape == (20,) for v in logits.values())
    direct = rerank.LetterScorer(loader, 20, rerank.RerankConfig(batch_size=2))({"row": np.arange(5), "prompt": np.array(texts, dtype=object)})
    np.testing.assert_allclose(np.stack([logits[r] for r in range(5)]), direct["letter_logits"], rtol=1e-4, atol=1e-4)


def test_the_tiny_models_letter_is_the_first_completion_token(tiny_llama_dir, ml100k_dir):
    from transformers import AutoTokenizer

    from recalign.data.dataset import Dataset
    from tests.helpers.pairs import assert_letters_are_first_completion_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = rerank.build_prompts(Dataset(ml100k_dir), "train", np.array([0]), tokenizer, PROMPT)[0]
    assert_letters_are_first_completion_tokens(tokenizer, prompt)


def test_passes_from_two_threads_each_get_their_own_logits(tiny_llama_dir, ml100k_dir):
    """A Serve replica scores a batch in one thread while its health check scores a probe in another: each
    pass must read its own answer positions (the LM-head hook is shared), and match a pass alone."""
    from concurrent.futures import ThreadPoolExecutor

    from recalign.data.dataset import Dataset

    loader = functools.partial(load_policy, str(tiny_llama_dir))
    scorer = rerank.LetterScorer(loader, 20, rerank.RerankConfig(batch_size=4))
    texts = rerank.build_prompts(Dataset(ml100k_dir), "test", np.arange(5), scorer.tokenizer, PROMPT)
    alone = {n: scorer._score(texts[:n], generate=False)[0] for n in (1, 4)}
    with ThreadPoolExecutor(2) as pool:
        for _ in range(10):
            futures = {n: pool.submit(scorer._score, texts[:n], n == 1) for n in (4, 1)}
            for n, future in futures.items():
                logits = future.result()[0]
                assert logits.shape == (n, 20)
                np.testing.assert_allclose(logits, alone[n], rtol=1e-4, atol=1e-4)


def test_the_engine_enters_score_keys_only_when_it_is_vllm():
    from recalign.config import to_dict

    default = rerank.RerankConfig()
    assert default.key() == {k: v for k, v in to_dict(default).items() if k != "engine" and not k.startswith("vllm_")}, \
        "a run scored with transformers keeps the score keys it had before the vllm engine existed"
    on_vllm = rerank.RerankConfig(engine="vllm")
    assert on_vllm.key()["engine"] == "vllm" and on_vllm.key() != default.key()
    assert rerank.RerankConfig(engine="vllm", vllm_kv_cache_gb=4.0).key() == on_vllm.key(), "memory is not a result"
    assert rerank.scorer_class(default) is rerank.LetterScorer
    assert rerank.scorer_class(on_vllm) is rerank.VLLMLetterScorer
    with pytest.raises(ValueError, match="engine must be one of transformers, vllm"):
        rerank.RerankConfig(engine="tgi")
