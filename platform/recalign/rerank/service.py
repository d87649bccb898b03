"""The re-ranking service behind the Serve app: validate a request, build the prompt, score.

A request names items by their dataset ids (strings, as in the source data):
    {"history": ["50", "172", "133"], "ratings": [5, 4, 3], "candidates": ["1", "2", "3", "4"]}
The reply ranks every candidate by the aligned LLM's letter logits:
    {"ranking": [{"item_id": "2", "title": "GoldenEye (1995)", "score": 3.1}, ...], "model": "..."}
Kept free of Ray so it is tested directly; serve/app.py wraps it in a deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from recalign import prompts
from recalign.errors import UserError
from recalign.rerank.scorer import LetterScorer, RerankConfig


class RequestError(UserError):
    """A bad request; the message names the field and the offending value."""


@dataclass
class ParsedRequest:
    history: list[int]  # item indices, oldest first
    ratings: list[float] | None
    candidates: list[int]
    candidate_ids: list[str]


class RerankService:
    def __init__(self, items, loader: Callable[[], tuple[Any, Any]], cfg: RerankConfig, prompt: prompts.PromptConfig,
                 model_name: str = ""):
        """items: the dataset's items frame (index item_idx; columns item_id, title, year, genres); prompt: the
        run's re-rank prompt (`recalign.pairs.stage.rerank_prompt`), the one its policies were trained on."""
        self.items = items
        self.index_of = {str(item_id): int(idx) for idx, item_id in zip(items.index, items["item_id"])}
        self.cfg = cfg
        self.prompt_cfg = prompt
        self.model_name = model_name
        self.scorer = LetterScorer(loader, len(prompts.LETTERS), cfg)
        self.tokenizer = self.scorer.tokenizer

    def parse(self, request: Any) -> ParsedRequest:
        if not isinstance(request, dict):
            raise RequestError("request body must be a JSON object with 'history' and 'candidates'")
        unknown = sorted(set(request) - {"history", "ratings", "candidates"})
        if unknown:
            raise RequestError(f"unknown field(s) {unknown}; expected history, ratings, candidates")
        history = self._items(request, "history", allow_empty=True)
        candidates = self._items(request, "candidates", allow_empty=False)
        if len(candidates) > len(prompts.LETTERS):
            raise RequestError(f"candidates: at most {len(prompts.LETTERS)} items, got {len(candidates)}")
        if len(set(candidates)) != len(candidates):
            raise RequestError("candidates: items must be distinct")
        ratings = request.get("ratings")
        if ratings is not None:
            if not isinstance(ratings, list) or len(ratings) != len(history):
                raise RequestError(f"ratings: expected a list of {len(history)} numbers (one per history item)")
            for i, r in enumerate(ratings):
                if not isinstance(r, (int, float)) or isinstance(r, bool):
                    raise RequestError(f"ratings[{i}]: not a number: {r!r}")
            ratings = [float(r) for r in ratings]
        return ParsedRequest([self.index_of[i] for i in history], ratings,
                             [self.index_of[i] for i in candidates], candidates)

    def _items(self, request: dict, field: str, allow_empty: bool) -> list[str]:
        values = request.get(field)
        if not isinstance(values, list) or (not values and not allow_empty):
            raise RequestError(f"{field}: expected a {'' if allow_empty else 'non-empty '}list of item ids")
        ids = [str(v) for v in values]
        for i, item_id in enumerate(ids):
            if item_id not in self.index_of:
                raise RequestError(f"{field}[{i}]: unknown item id {item_id!r}")
        return ids

    def prompt(self, req: ParsedRequest) -> str:
        return prompts.render(self.tokenizer, prompts.rerank_messages(
            self.items, req.history, req.ratings, req.candidates, self.prompt_cfg))

    def rerank(self, requests: list[Any]) -> list[dict]:
        """Score a batch of parsed-or-raw requests in one pass; each reply ranks its candidates."""
        parsed = [r if isinstance(r, ParsedRequest) else self.parse(r) for r in requests]
        texts = np.array([self.prompt(p) for p in parsed], dtype=object)
        out = self.scorer({"row": np.arange(len(parsed)), "prompt": texts})
        replies = []
        for p, logits in zip(parsed, out["letter_logits"]):
            scores = logits[:len(p.candidates)]
            order = np.argsort(-scores, kind="stable")
            replies.append({"model": self.model_name, "ranking": [
                {"item_id": p.candidate_ids[i], "title": prompts.describe_item(self.items, p.candidates[i], False),
                 "score": float(scores[i])} for i in order]})
        return replies
