"""Test helpers for the reward stages: a tiny random BERT encoder and synthetic samples tables.

Synthetic analyses name the genres of the user's train history (with random choices per sample),
so a knowledge-augmented model has something real to read. They are for tests only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from recalign import io
from recalign.data.dataset import DataConfig, Dataset, prepare
from recalign.data.protocol import ProtocolConfig
from recalign.prompts import PromptConfig, knowledge_messages
from recalign.sampling.actors import SAMPLES_SCHEMA, part_name

GENRES = ["action", "adventure", "animation", "children's", "comedy", "crime", "documentary", "drama", "fantasy",
          "film-noir", "horror", "musical", "mystery", "romance", "sci-fi", "thriller", "war", "western", "unknown"]
WORDS = ["the", "user", "likes", "enjoys", "dislikes", "and", "from", "old", "new", "movies", "films", "dark",
         "light", "mood", "themes", "era", "nineties", "eighties", "classic", "sentinel", "test", "item", "."]

SENTINEL_TEST = "SENTINEL TEST ITEM"
SENTINEL_VALID = "SENTINEL VALID ITEM"


def save_tiny_bert(path: str | Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """A random 1-layer BERT + WordPiece tokenizer over a small vocabulary, saved as an HF folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path = Path(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(GENRES + WORDS))
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=2 * hidden_size,
                                 max_position_embeddings=128))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _render(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def synthetic_analysis(data: Dataset, history: np.ndarray, rng: np.random.Generator) -> str:
    counts: dict[str, int] = {}
    for item in history[history > 0]:
        for genre in data.items.loc[int(item), "genres"]:
            counts[str(genre).lower()] = counts.get(str(genre).lower(), 0) + 1
    liked = sorted(counts, key=lambda g: -counts[g])[:3] or ["drama"]
    picks = rng.choice(liked, size=min(2, len(liked)), replace=False)
    noise = rng.choice(GENRES, size=1)[0]
    return f"the user likes {' and '.join(picks)} movies and {noise} films from the nineties ."


def make_samples(data: Dataset, num_samples: int = 3, users: np.ndarray | None = None, seed: int = 0,
                 splits: tuple[str, ...] = ("train",)) -> pa.Table:
    """A samples table with the sampling stage's schema: `num_samples` analyses per (user, split)."""
    rows = []
    for split_name in splits:
        split = data.split(split_name)
        for row in range(len(split)):
            user = int(split.user_idx[row])
            if users is not None and user not in set(users.tolist()):
                continue
            prompt = _render(knowledge_messages(data.items, split.history[row], split.history_ratings[row],
                                                PromptConfig()))
            for s in range(num_samples):
                rng = np.random.default_rng([seed, user, s])
                text = synthetic_analysis(data, split.history[row], rng)
                rows.append((user, str(user), split_name, s, prompt, text, len(prompt.split()), len(text.split()),
                             "stop", "synthetic", "synthetic", seed))
    return pa.table({name: pa.array([r[i] for r in rows], type=SAMPLES_SCHEMA.field(name).type)
                     for i, name in enumerate(SAMPLES_SCHEMA.names)}, schema=SAMPLES_SCHEMA)


def make_tiny_dataset(root: str | Path, num_users: int = 24, num_items: int = 40, sentinels: bool = False,
                      seed: int = 0, num_candidates: int = 20) -> str:
    """A prepared dataset of clustered random interactions; returns its data dir.

    With `sentinels`, every user's second-to-last interaction is one shared item titled SENTINEL VALID
    ITEM and the last one SENTINEL TEST ITEM: the protocol makes them every user's valid and test
    targets, and since every user has seen them they are never anyone's negative candidate.
    """
    import pandas as pd

    root = Path(root)
    rng = np.random.default_rng(seed)
    genres = ["Drama", "Comedy", "Horror", "Sci-Fi"]
    items = [{"item_id": str(i), "title": f"Movie {i}", "year": 1990 + i % 10, "genres": [genres[i % 4]]}
             for i in range(1, num_items + 1)]
    if sentinels:
        items += [{"item_id": "valid", "title": SENTINEL_VALID, "year": 2000, "genres": ["Drama"]},
                  {"item_id": "test", "title": SENTINEL_TEST, "year": 2000, "genres": ["Drama"]}]
    rows = []
    for user in range(num_users):
        liked = [i for i in range(1, num_items + 1) if i % 4 == user % 4]
        length = int(rng.integers(7, 12))
        seq = list(rng.choice(liked, size=min(length, len(liked)), replace=False))
        seq = [str(i) for i in seq] + (["valid", "test"] if sentinels else [])
        rows += [{"user_id": f"u{user}", "item_id": item, "timestamp": t, "rating": float(rng.integers(1, 6))}
                 for t, item in enumerate(seq)]
    pd.DataFrame(rows).to_parquet(root / "interactions.parquet")
    pd.DataFrame(items).to_parquet(root / "items.parquet")
    data_dir = str(root / "runs" / "tiny" / "data")
    prepare(DataConfig(source="table", interactions=str(root / "interactions.parquet"),
                       items=str(root / "items.parquet"), name="tiny",
                       protocol=ProtocolConfig(num_candidates=num_candidates)), data_dir)
    return data_dir


def write_samples(table: pa.Table, samples_dir: str) -> None:
    """Write a samples table the way the sampling stage does (part files + meta.json)."""
    users = sorted(set(table["user_idx"].to_pylist()))
    io.write_parquet(table, io.join(samples_dir, part_name(users)))
    io.write_json({"num_rows": table.num_rows, "synthetic": True}, io.join(samples_dir, "meta.json"))
