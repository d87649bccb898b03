"""SASRec (Kang & McAuley, 2018): causal self-attention over a user's item sequence.

Item index 0 is padding. Scores are dot products between the sequence representation and the
(shared) item embedding table, so one model scores any candidate list or the whole catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recalign.config import option


@dataclass
class SASRecConfig:
    hidden_size: int = option(64, "width of the item embeddings and the transformer")
    num_layers: int = option(2, "self-attention blocks")
    num_heads: int = option(2, "attention heads per block")
    dropout: float = option(0.2, "dropout on the embeddings and inside every block")
    max_len: int = option(50, "longest input sequence (train windows and histories are cut to this)")


class SASRec(nn.Module):
    def __init__(self, num_items: int, cfg: SASRecConfig):
        super().__init__()
        self.num_items = num_items
        self.cfg = cfg
        self.item_emb = nn.Embedding(num_items + 1, cfg.hidden_size, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.hidden_size, cfg.num_heads, dim_feedforward=cfg.hidden_size * 4,
                                           dropout=cfg.dropout, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden_size)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def sequence_states(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, L) left-padded item indices -> hidden states (B, L, d), causal."""
        seq = seq[:, -self.cfg.max_len:]
        length = seq.shape[1]
        positions = torch.arange(length, device=seq.device).unsqueeze(0)
        x = self.item_emb(seq) * (self.cfg.hidden_size ** 0.5) + self.pos_emb(positions)
        x = self.dropout(x)
        padding = seq == 0  # (B, L)
        # Query q sees keys k <= q that are real items; every query also sees itself, so a row
        # of a fully padded prefix is never all-masked (which would give NaN).
        idx = torch.arange(length, device=seq.device)
        allowed = (idx.view(1, 1, -1) <= idx.view(1, -1, 1)) & ~padding.unsqueeze(1)
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=seq.device)
        mask = (~allowed).repeat_interleave(self.cfg.num_heads, dim=0)  # (B * heads, L, L)
        x = self.encoder(x, mask=mask)
        x = self.norm(x)
        return x * (~padding).unsqueeze(-1)

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """history (B, L) left-padded -> user representation (B, d) at the last position."""
        return self.sequence_states(history)[:, -1]

    def score_candidates(self, user: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """user (B, d), candidates (B, C) item indices -> scores (B, C)."""
        return torch.einsum("bd,bcd->bc", user, self.item_emb(candidates))

    def score_all(self, user: torch.Tensor) -> torch.Tensor:
        """user (B, d) -> scores over the catalogue (B, num_items + 1); column 0 is padding."""
        return user @ self.item_emb.weight.T

    def forward(self, history: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """With candidates (B, C): their scores (B, C). Without: every position's state (B, L, d),
        for training; going through forward keeps DDP's gradient hooks in the loop."""
        if candidates is None:
            return self.sequence_states(history)
        return self.score_candidates(self.encode(history), candidates)


def next_item_loss(states: torch.Tensor, item_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Full-softmax cross-entropy of every position's next item; targets 0 (padding) are ignored.

    states: (B, L, d) sequence states; item_weight: (N + 1, d) item embeddings (row 0 = padding);
    targets: (B, L) where targets[:, t] is the item after position t. Returns the mean loss (scalar).
    """
    logits = states @ item_weight.T  # (B, L, N + 1)
    logits[..., 0] = float("-inf")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=0)
