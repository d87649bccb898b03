"""The evaluation stage's config: which split and metrics, which users the LLM systems are scored on,
how the LLM re-ranker scores and how the knowledge policies write their analyses."""

from __future__ import annotations

from dataclasses import dataclass

from recalign.config import option
from recalign.evaluation.knowledge import KnowledgeGenConfig
from recalign.rerank.fusion import FusionConfig
from recalign.rerank.scorer import RerankConfig
from recalign.systems import EvalConfig


@dataclass
class FinalEvalConfig:
    eval: EvalConfig = option(factory=EvalConfig, help="split, metrics, bootstrap, reference system")
    llm_users: int = option(200, "test users the LLM-based systems are scored on (seeded subset); 0 = all")
    valid_users: int = option(64, "validation users every LLM re-ranker is also scored on (seeded subset; 0 = all): "
                                  "they choose fusion's weight and its re-ranker, and their metrics "
                                  "(eval/validation.json) pick the endpoint's default system; -1 = none, no fusion")
    subset_seed: int = option(0, "seeds both subsets")
    transfer_from: str = option("", "another run (its dir or URI, e.g. runs/demo) whose finished re-rank policies "
                                    "are also scored here, as 'llm <label> (from <run name>)', each with the "
                                    "prompt it was trained on: does a re-ranker trained on one dataset rank "
                                    "another's users? Both runs must share the base model")
    transfer_policies: list[str] = option(factory=list, help="labels of those policies (sft, sft+sdpo, ...); "
                                                             "empty: every finished one")
    fusion: FusionConfig = option(factory=FusionConfig, help="SASRec + w * the best re-ranker's letter logits")
    rerank: RerankConfig = option(factory=RerankConfig, help="direct LLM re-ranker prompts and scoring")
    knowledge: KnowledgeGenConfig = option(factory=KnowledgeGenConfig, help="analyses for KA-SASRec")
