"""Sampled analyses as the knowledge-augmented recommender reads them: dense per-user arrays of text embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class KnowledgeTable:
    """Embeddings as dense arrays indexed by user: what the KA model reads.

    vectors (num_users, N, d) float32, zero where missing; present (num_users, N) bool.
    """

    vectors: np.ndarray
    present: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[-1])

    def mean(self) -> np.ndarray:
        """(num_users, d) per-user mean of the present samples, re-normalised to unit length; 0 where none."""
        counts = self.present.sum(axis=1, keepdims=True)  # (U, 1)
        summed = (self.vectors * self.present[..., None]).sum(axis=1)
        mean = summed / np.maximum(counts, 1)
        norm = np.linalg.norm(mean, axis=1, keepdims=True)
        return np.where(norm > 0, mean / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def knowledge_table(embeddings: pa.Table, num_users: int) -> KnowledgeTable:
    """Dense (num_users, N, d) view of an embeddings table; N = 1 + the largest sample_idx."""
    users = embeddings["user_idx"].to_numpy().astype(np.int64)
    samples = embeddings["sample_idx"].to_numpy().astype(np.int64)
    if len(users) and (users.min() < 0 or users.max() >= num_users):
        raise ValueError(f"embeddings: user_idx outside [0, {num_users}) (max {users.max()})")
    if len(samples) and samples.min() < 0:
        raise ValueError("embeddings: negative sample_idx")
    flat = embeddings["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    dim = len(flat) // max(len(users), 1) if len(users) else 0
    if len(users) and dim * len(users) != len(flat):
        raise ValueError("embeddings: rows have different lengths")
    n = int(samples.max()) + 1 if len(samples) else 1
    vectors = np.zeros((num_users, n, dim), dtype=np.float32)
    present = np.zeros((num_users, n), dtype=bool)
    vectors[users, samples] = flat.reshape(len(users), dim)
    present[users, samples] = True
    if present.sum() != len(users):
        raise ValueError("embeddings: duplicate (user_idx, sample_idx) rows")
    return KnowledgeTable(vectors, present)
