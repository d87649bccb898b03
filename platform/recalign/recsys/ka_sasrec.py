"""Knowledge-augmented SASRec (KAR style, Xi et al. 2023): SASRec plus a gated knowledge adaptor.

A frozen text encoder turns an LLM's analysis of the user into a vector; an adaptor MLP maps it to
the hidden size, and a gate decides, per position and dimension, how much of it to add to the
sequence representation:

    k = adaptor(text_embedding) * present          # (B, d), 0 when no text is given
    g = sigmoid(W_g [h_t ; k] + b_g)               # (B, L, d)
    h'_t = h_t + g * k

Fusing residually means a row fed no knowledge (present = 0) goes through exactly the plain
SASRec computation, so knowledge dropout during training keeps that path working, and the model
can be scored with and without the text on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recalign.config import option
from recalign.recsys.sasrec import SASRec, SASRecConfig


@dataclass
class KAConfig:
    adaptor_hidden: int = option(128, "hidden width of the adaptor MLP (text embedding -> hidden_size)")
    adaptor_dropout: float = option(0.1, "dropout inside the adaptor")
    knowledge_dropout: float = option(0.2, "share of training rows fed no knowledge, so the no-text path keeps working")

    def __post_init__(self) -> None:
        if not 0.0 <= self.knowledge_dropout <= 1.0:
            raise ValueError(f"knowledge_dropout must be in [0, 1], got {self.knowledge_dropout}")
        if self.adaptor_hidden < 1:
            raise ValueError(f"adaptor_hidden must be >= 1, got {self.adaptor_hidden}")


class KASASRec(nn.Module):
    def __init__(self, num_items: int, cfg: SASRecConfig, ka: KAConfig, knowledge_dim: int):
        super().__init__()
        if knowledge_dim < 1:
            raise ValueError(f"knowledge_dim must be >= 1, got {knowledge_dim}")
        self.num_items = num_items
        self.cfg = cfg
        self.ka = ka
        self.knowledge_dim = knowledge_dim
        d = cfg.hidden_size
        self.sasrec = SASRec(num_items, cfg)
        self.adaptor = nn.Sequential(
            nn.Linear(knowledge_dim, ka.adaptor_hidden), nn.GELU(), nn.Dropout(ka.adaptor_dropout),
            nn.Linear(ka.adaptor_hidden, d), nn.LayerNorm(d),
        )
        self.gate = nn.Linear(2 * d, d)

    @property
    def item_emb(self) -> nn.Embedding:
        return self.sasrec.item_emb

    def fuse(self, states: torch.Tensor, knowledge: torch.Tensor | None, present: torch.Tensor | None) -> torch.Tensor:
        """states (B, L, d) or (B, d); knowledge (B, d_k) text embeddings; present (B,) bool, or (B, L) for
        (B, L, d) states: which positions may read the knowledge (an analysis only informs the predictions
        of items after the history it was written from).

        Returns states of the same shape with the gated knowledge added; positions with present = False
        (or knowledge None) come back unchanged.
        """
        if knowledge is None:
            return states
        if knowledge.shape != (states.shape[0], self.knowledge_dim):
            raise ValueError(f"knowledge must be (B, {self.knowledge_dim}), got {tuple(knowledge.shape)}")
        if present is None:
            present = torch.ones(states.shape[:-1], dtype=torch.bool, device=states.device)
        k = self.adaptor(knowledge.to(states.dtype))  # (B, d)
        if states.dim() == 3:
            k = k.unsqueeze(1).expand_as(states)  # (B, L, d): the user's vector, masked per position below
            if present.dim() == 1:
                present = present.unsqueeze(1).expand(states.shape[:2])
        if present.shape != states.shape[:-1]:
            raise ValueError(f"present must be {tuple(states.shape[:-1])} or (B,), got {tuple(present.shape)}")
        k = k * present.to(states.dtype).unsqueeze(-1)
        g = torch.sigmoid(self.gate(torch.cat([states, k], dim=-1)))
        return states + g * k

    def encode(self, history: torch.Tensor, knowledge: torch.Tensor | None = None,
               present: torch.Tensor | None = None) -> torch.Tensor:
        """history (B, L) left-padded -> user representation (B, d) at the last position, with knowledge."""
        return self.fuse(self.sasrec.encode(history), knowledge, present)

    def catalogue_logp(self, history: torch.Tensor, knowledge: torch.Tensor | None = None,
                       present: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N + 1) log-probabilities of every item being next (column 0, padding, is -inf)."""
        logits = self.sasrec.score_all(self.encode(history, knowledge, present))
        logits[:, 0] = float("-inf")
        return torch.log_softmax(logits.float(), dim=-1)

    def forward(self, history: torch.Tensor, candidates: torch.Tensor | None = None,
                knowledge: torch.Tensor | None = None, present: torch.Tensor | None = None) -> torch.Tensor:
        """With candidates (B, C): their scores (B, C). Without: every position's fused state (B, L, d)
        for training; going through forward keeps DDP's gradient hooks in the loop."""
        if candidates is None:
            states = self.sasrec.sequence_states(history)
            # Padding positions stay zero, as in SASRec (their targets are ignored anyway).
            return self.fuse(states, knowledge, present) * (history[:, -states.shape[1]:] != 0).unsqueeze(-1)
        return self.sasrec.score_candidates(self.encode(history, knowledge, present), candidates)
