"""Test helpers for the reward stages: a tiny random BERT encoder and synthetic samples tables.

Synthetic analyses name the genres of the user's train history (with random choices per sample),
so a knowledge-augmented model has something real to read. They are for tests only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from recalign import io
from recalign.data.dataset import Dataset
from recalign.prompts import PromptConfig, knowledge_messages
from recalign.sampling.actors import SAMPLES_SCHEMA, part_name

GENRES = ["action", "adventure", "animation", "children's", "comedy", "crime", "documentary", "drama", "fantasy",
          "film-noir", "horror", "musical", "mystery", "romance", "sci-fi", "thriller", "war", "western", "unknown"]
WORDS = ["the", "user", "likes", "enjoys", "dislikes", "and", "from", "old", "new", "movies", "films", "dark",
         "light", "mood", "themes", "era", "nineties", "eighties", "classic", "sentinel", "test", "item", "."]



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


def write_samples(table: pa.Table, samples_dir: str) -> None:
    """Write a samples table the way the sampling stage does: each split's rows under samples_dir/<split>/
    (part files + meta.json, and the prompt settings in config.json as the real stage pins them)."""
    import dataclasses

    import pyarrow.compute as pc

    for split in sorted(set(table["split"].to_pylist())):
        rows = table.filter(pc.equal(table["split"], split))
        set_dir = io.join(samples_dir, split)
        io.write_parquet(rows, io.join(set_dir, part_name(sorted(set(rows["user_idx"].to_pylist())))))
        io.write_json({"key": {"prompt": dataclasses.asdict(PromptConfig())}}, io.join(set_dir, "config.json"))
        io.write_json({"num_rows": rows.num_rows, "synthetic": True}, io.join(set_dir, "meta.json"))
