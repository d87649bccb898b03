"""The evaluation stage's config: which split and metrics, which users the LLM systems are scored on,
how the LLM re-ranker scores and how the knowledge policies write their analyses."""

from __future__ import annotations

from dataclasses import dataclass, field

from recalign.evaluation.knowledge import KnowledgeGenConfig
from recalign.systems import EvalConfig
from recalign.rerank.scorer import RerankConfig


@dataclass
class FinalEvalConfig:
    eval: EvalConfig = field(default_factory=EvalConfig)  # split, metrics, bootstrap, reference system
    llm_users: int = 200  # test users the LLM-based systems are scored on (seeded subset); 0 = all
    subset_seed: int = 0  # seeds that subset
    rerank: RerankConfig = field(default_factory=RerankConfig)  # direct LLM re-ranker prompts and scoring
    knowledge: KnowledgeGenConfig = field(default_factory=KnowledgeGenConfig)  # analyses for KA-SASRec
