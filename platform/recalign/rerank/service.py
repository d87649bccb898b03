"""The re-ranking service behind the Serve app: resolve a validated request (recalign.rerank.api) against the
run's items and users, build the prompt, score.

A request names items by their dataset ids (strings, as in the source data), or a user by id:
    {"history": ["50", "172", "133"], "ratings": [5, 4, 3], "candidates": ["1", "2", "3", "4"]}
The reply ranks the candidates by one system's scores:
    {"ranking": [{"item_id": "2", "title": "GoldenEye (1995)", "score": 3.1}, ...], "model": "..."}
- llm: the aligned LLM's letter logits (a loader, no SASRec);
- sasrec: the run's SASRec (no loader): its scores of the candidates after the history's last H items;
- fusion: both, standardised per request and added as in evaluation (recalign.rerank.fusion), with the
  weight the run chose on its validation users.
Kept free of Ray so it is tested directly; serve/app.py wraps it in a deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from recalign import prompts
from recalign.llm.collab import prompt_for
from recalign.rerank.fusion import fuse
from recalign.rerank.api import ApiError, ApiLimits, RerankRequest, parse_request, short
from recalign.rerank.scorer import RerankConfig, scorer_class


@dataclass
class ParsedRequest:
    history: list[int]  # item indices, oldest first
    ratings: list[float] | None
    candidates: list[int]
    candidate_ids: list[str]
    top_n: int | None = None
    explain: bool = False


class RerankService:
    def __init__(self, items, loader: Callable[[], tuple[Any, Any]] | None, cfg: RerankConfig,
                 prompt: prompts.PromptConfig, model_name: str = "", users=None, limits: ApiLimits | None = None,
                 sasrec=None, history_len: int = 20, fusion_weight: float | None = None):
        """items: the dataset's items frame (index item_idx; columns item_id, title, year, genres); loader: the
        LLM's (model, tokenizer), None for SASRec alone; prompt: the run's re-rank prompt
        (`recalign.pairs.stage.rerank_prompt`), the one its policies were trained on; users: the dataset's users
        table as pandas (user_id, train_items, train_ratings), for requests by user_id; sasrec: the run's SASRec,
        fed the last `history_len` items; fusion_weight: with both, serve their fusion with this weight."""
        if loader is None and sasrec is None:
            raise ValueError("a service needs an LLM loader, a SASRec or both")
        if (fusion_weight is not None) != (loader is not None and sasrec is not None):
            raise ValueError("fusion takes an LLM loader, a SASRec and fusion_weight; one model takes neither weight "
                             "nor the other")
        self.items = items
        self.index_of = {str(item_id): int(idx) for idx, item_id in zip(items.index, items["item_id"])}
        self.users = ({str(u): (list(h), list(r)) for u, h, r in zip(users["user_id"], users["train_items"],
                                                                    users["train_ratings"])}
                      if users is not None else {})
        self.cfg = cfg
        self.prompt_cfg = prompt
        self.model_name = model_name
        self.limits = limits or ApiLimits()
        self.sasrec, self.history_len, self.fusion_weight = sasrec, history_len, fusion_weight
        self.kind = "fusion" if fusion_weight is not None else "llm" if loader is not None else "sasrec"
        self.scorer = scorer_class(cfg)(loader, len(prompts.LETTERS), cfg) if loader is not None else None
        self.tokenizer = self.scorer.tokenizer if self.scorer is not None else None
        if self.scorer is not None:
            self.prompt_cfg = prompt_for(prompt, self.scorer.has_projector)

    def parse(self, request: Any) -> ParsedRequest:
        """A JSON value (or a validated RerankRequest) -> item indices; ApiError (4xx) naming the field."""
        req = request if isinstance(request, RerankRequest) else parse_request(request, self.limits)
        if req.user_id is not None:
            if req.user_id not in self.users:
                raise ApiError(404, "user_id", f"unknown user {short(req.user_id)}")
            history, ratings = self.users[req.user_id]
            history, ratings = [int(i) for i in history], [float(r) for r in ratings]
        else:
            history = self._items(req.history, "history")
            ratings = req.ratings
        return ParsedRequest(history, ratings, self._items(req.candidates, "candidates"), list(req.candidates),
                             req.top_n, req.explain)

    def _items(self, ids: list[str], field: str) -> list[int]:
        out = []
        for i, item_id in enumerate(ids):
            if item_id not in self.index_of:
                raise ApiError(422, f"{field}[{i}]", f"unknown item id {short(item_id)}")
            out.append(self.index_of[item_id])
        return out

    def prompt(self, req: ParsedRequest) -> str:
        return prompts.render(self.tokenizer, prompts.rerank_messages(
            self.items, req.history, req.ratings, req.candidates, self.prompt_cfg))

    def rerank(self, requests: list[Any]) -> list[dict]:
        """Score a batch of parsed-or-raw requests, one forward pass per scorer chunk; the free-text answer is
        decoded only for requests with explain=true (and an LLM). Each reply ranks its candidates (its top_n best)."""
        parsed = [r if isinstance(r, ParsedRequest) else self.parse(r) for r in requests]
        logits, answers = self._letter_logits(parsed) if self.scorer is not None else ([None] * len(parsed),
                                                                                        [None] * len(parsed))
        replies = []
        for p, row_logits, answer in zip(parsed, logits, answers):
            scores = None if row_logits is None else row_logits[:len(p.candidates)]
            if self.sasrec is not None:
                sasrec = self._sasrec_scores(p)
                scores = sasrec if scores is None else fuse(sasrec[None], scores[None], self.fusion_weight)[0]
            order = np.argsort(-scores, kind="stable")[:p.top_n or len(p.candidates)]
            replies.append({"model": self.model_name, "explanation": answer, "ranking": [
                {"item_id": p.candidate_ids[i], "title": prompts.describe_item(self.items, p.candidates[i], False),
                 "score": float(scores[i])} for i in order]})
        return replies

    def _letter_logits(self, parsed: list[ParsedRequest]) -> tuple[list[np.ndarray], list[str | None]]:
        logits: list[np.ndarray | None] = [None] * len(parsed)
        answers: list[str | None] = [None] * len(parsed)
        for explain in (False, True):
            rows = [i for i, p in enumerate(parsed) if p.explain == explain]
            if not rows:
                continue
            texts = np.array([self.prompt(parsed[i]) for i in rows], dtype=object)
            out = self.scorer({"row": np.array(rows), "prompt": texts}, generate=explain)
            for i, row_logits, answer in zip(rows, out["letter_logits"], out["answer"]):
                logits[i], answers[i] = row_logits, (str(answer) if explain else None)
        return logits, answers

    def _sasrec_scores(self, p: ParsedRequest) -> np.ndarray:
        """SASRec's scores of the request's candidates after its last history_len items (left-padded with 0)."""
        from recalign.data.dataset import left_pad
        from recalign.recsys.train import score_split

        history = left_pad([p.history], self.history_len, 0, np.int64)
        return score_split(self.sasrec, history, np.asarray([p.candidates], dtype=np.int64))[0].astype(np.float64)
