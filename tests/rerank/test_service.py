"""The re-ranking service: every candidate ranked by its letter logit; bad requests name the field."""

import functools

import numpy as np
import pytest

from recalign.data.dataset import Dataset
from recalign.llm.policy import load_policy
from recalign.prompts import PromptConfig
from recalign.rerank.scorer import RerankConfig
from recalign.rerank.api import ApiError
from recalign.rerank.service import RerankService


@pytest.fixture(scope="module")
def service(tiny_llama_dir, ml100k_dir):
    loader = functools.partial(load_policy, str(tiny_llama_dir))
    data = Dataset(ml100k_dir)
    return RerankService(data.items, loader, RerankConfig(max_new_tokens=1),
                         PromptConfig(max_history=10, show_genres=False), model_name="tiny",
                         users=data.tables["users"].to_pandas())


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


@pytest.mark.parametrize("request_body, status, field, pattern", [
    ({"history": ["1"], "candidates": ["2", "999999"]}, 422, "candidates[1]", r"unknown item id '999999'"),
    ({"history": ["1"], "candidates": []}, 422, "candidates", r"at least 1"),
    ({"history": ["1"], "candidates": ["2", "2"]}, 422, "candidates[1]", r"duplicate"),
    ({"history": ["1", "2"], "ratings": [5], "candidates": ["3"]}, 422, "ratings", r"one rating per history item"),
    ({"history": ["1"], "ratings": ["x"], "candidates": ["3"]}, 422, "ratings[0]", r"valid number"),
    ({"history": ["1"], "candidates": [str(i) for i in range(1, 30)]}, 422, "candidates", r"at most 26"),
    ({"histories": [], "candidates": ["1"]}, 422, "histories", r"unknown field"),
    ({"user_id": "no-such-user", "candidates": ["1"]}, 404, "user_id", r"unknown user"),
    (["1", "2"], 422, "body", r"JSON object"),
])
def test_bad_requests_name_the_field(service, request_body, status, field, pattern):
    with pytest.raises(ApiError, match=pattern) as err:
        service.parse(request_body)
    assert (err.value.status, err.value.field) == (status, field)


def test_a_known_user_is_ranked_on_their_train_history_and_top_n_cuts(service):
    user = service.users["1"]
    by_user = service.rerank([{"user_id": "1", "candidates": ["1", "2", "3", "4"], "top_n": 2}])[0]
    ids = [str(service.items.loc[i, "item_id"]) for i in user[0]]
    # The prompt shows the last max_history (10) items: the same ten sent as a history give the same ranking.
    by_history = service.rerank([{"history": ids[-10:], "ratings": user[1][-10:], "candidates": ["1", "2", "3", "4"]}])[0]
    assert [r["item_id"] for r in by_user["ranking"]] == [r["item_id"] for r in by_history["ranking"]][:2]
    assert by_user["explanation"] is None


def test_explain_decodes_an_answer_without_changing_the_scores(service):
    request = {"history": ["50", "172"], "candidates": ["1", "2", "3"]}
    plain, explained = service.rerank([request, {**request, "explain": True}])
    assert plain["explanation"] is None and isinstance(explained["explanation"], str)
    assert [r["score"] for r in plain["ranking"]] == pytest.approx([r["score"] for r in explained["ranking"]],
                                                                   rel=1e-4, abs=1e-4)


def test_sasrec_and_fusion_services_score_as_evaluation_does(service, tiny_llama_dir, ml100k_dir):
    """SASRec alone scores the candidates after the history's last H items; fusion adds the standardised scores of
    SASRec and the letter logits with the run's weight (recalign.rerank.fusion), as the evaluation did."""
    import torch

    from recalign.rerank.fusion import fuse
    from recalign.recsys.sasrec import SASRec, SASRecConfig
    from recalign.recsys.train import score_split

    data = Dataset(ml100k_dir)
    torch.manual_seed(0)
    sasrec = SASRec(data.num_items, SASRecConfig(hidden_size=8, num_layers=1, num_heads=1, max_len=20)).eval()
    alone = RerankService(data.items, None, RerankConfig(), service.prompt_cfg, sasrec=sasrec, history_len=20)
    loader = functools.partial(load_policy, str(tiny_llama_dir))
    fused = RerankService(data.items, loader, RerankConfig(max_new_tokens=1), service.prompt_cfg, sasrec=sasrec,
                          history_len=20, fusion_weight=0.7)
    request = {"history": [str(i) for i in range(1, 26)], "candidates": ["30", "40", "50", "60"], "explain": True}
    history = np.array([list(range(6, 26))])  # the last 20 of the 25 (item ids are item indices in ml-100k)
    candidates = np.array([[service.index_of[c] for c in request["candidates"]]])
    expected_sasrec = score_split(sasrec, history, candidates)[0]
    reply = alone.rerank([request])[0]
    assert alone.kind == "sasrec" and reply["explanation"] is None
    assert {r["item_id"]: r["score"] for r in reply["ranking"]} == pytest.approx(
        dict(zip(request["candidates"], expected_sasrec.tolist())), abs=1e-5)
    llm = {r["item_id"]: r["score"] for r in service.rerank([request])[0]["ranking"]}
    expected = fuse(expected_sasrec[None], np.array([[llm[c] for c in request["candidates"]]]), 0.7)[0]
    reply = fused.rerank([request])[0]
    assert fused.kind == "fusion" and isinstance(reply["explanation"], str)
    assert {r["item_id"]: r["score"] for r in reply["ranking"]} == pytest.approx(
        dict(zip(request["candidates"], expected.tolist())), abs=1e-4)
    with pytest.raises(ValueError, match="fusion takes"):
        RerankService(data.items, loader, RerankConfig(), service.prompt_cfg, sasrec=sasrec)
    with pytest.raises(ValueError, match="needs an LLM loader"):
        RerankService(data.items, None, RerankConfig(), service.prompt_cfg)


def test_a_hybrid_policy_reads_item_tokens_and_the_base_model_titles(tiny_llama_dir, ml100k_dir, tmp_path):
    from recalign.llm.collab import CollabLM
    from tests.helpers.collab import save_collab_adapter

    data = Dataset(ml100k_dir)
    save_collab_adapter(tiny_llama_dir, data.num_items, tmp_path)
    hybrid = PromptConfig(max_history=10, show_genres=False, item_tokens="hybrid")
    request = {"history": ["50", "172", "133"], "ratings": [5, 4, 3], "candidates": ["1", "2", "3"]}
    served = RerankService(data.items, functools.partial(load_policy, str(tiny_llama_dir), str(tmp_path)),
                           RerankConfig(max_new_tokens=1), hybrid, model_name="hybrid")
    assert isinstance(served.scorer.model, CollabLM) and "<item:" in served.prompt(served.parse(request))
    assert sorted(r["item_id"] for r in served.rerank([request])[0]["ranking"]) == ["1", "2", "3"]
    base = RerankService(data.items, functools.partial(load_policy, str(tiny_llama_dir)), RerankConfig(max_new_tokens=1),
                         hybrid, model_name="tiny")
    assert "<item:" not in base.prompt(base.parse(request)), "a policy without a projector is prompted with titles"
    assert len(base.rerank([request])[0]["ranking"]) == 3
