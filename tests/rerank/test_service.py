"""The re-ranking service: every candidate ranked by its letter logit; bad requests name the field."""

import functools

import numpy as np
import pytest

from recalign.data.dataset import Dataset
from recalign.llm.policy import load_policy
from recalign.prompts import PromptConfig
from recalign.rerank.scorer import RerankConfig
from recalign.rerank.service import RequestError, RerankService


@pytest.fixture(scope="module")
def service(tiny_llama_dir, ml100k_dir):
    loader = functools.partial(load_policy, str(tiny_llama_dir))
    return RerankService(Dataset(ml100k_dir).items, loader, RerankConfig(max_new_tokens=1),
                         PromptConfig(max_history=10, show_genres=False), model_name="tiny")


def test_rerank_ranks_every_candidate_by_letter_logit(service):
    request = {"history": ["50", "172", "133"], "ratings": [5, 4, 3], "candidates": ["1", "2", "3", "4", "5"]}
    reply = service.rerank([request])[0]
    ranking = reply["ranking"]
    assert sorted(r["item_id"] for r in ranking) == ["1", "2", "3", "4", "5"]
    scores = [r["score"] for r in ranking]
    assert scores == sorted(scores, reverse=True)
    assert {r["title"] for r in ranking} >= {"Toy Story (1995)", "GoldenEye (1995)"}
    # Same logits as scoring the prompt directly.
    parsed = service.parse(request)
    direct = service.scorer({"row": np.array([0]), "prompt": np.array([service.prompt(parsed)], dtype=object)})
    by_id = {r["item_id"]: r["score"] for r in ranking}
    assert [by_id[i] for i in ["1", "2", "3", "4", "5"]] == pytest.approx(direct["letter_logits"][0][:5].tolist(),
                                                                          rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("request_body, pattern", [
    ({"history": ["1"], "candidates": ["2", "999999"]}, r"candidates\[1\]: unknown item id '999999'"),
    ({"history": ["1"], "candidates": []}, r"candidates: expected a non-empty list"),
    ({"history": ["1"], "candidates": ["2", "2"]}, r"distinct"),
    ({"history": ["1", "2"], "ratings": [5], "candidates": ["3"]}, r"ratings: expected a list of 2"),
    ({"history": ["1"], "ratings": ["x"], "candidates": ["3"]}, r"ratings\[0\]: not a number"),
    ({"history": ["1"], "candidates": [str(i) for i in range(1, 30)]}, r"at most 26"),
    ({"histories": [], "candidates": ["1"]}, r"unknown field"),
    (["1", "2"], r"JSON object"),
])
def test_bad_requests_name_the_field(service, request_body, pattern):
    with pytest.raises(RequestError, match=pattern):
        service.parse(request_body)
