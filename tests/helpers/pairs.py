"""Small synthetic pairs files for the alignment tests: ml-100k prompts rendered with the tiny tokenizer."""

from __future__ import annotations

import dataclasses
import os

from recalign import io
from recalign.prompts import PromptConfig

# Short histories keep the tiny tokenizer's prompts (a 512-token BPE) a few hundred tokens long.
TEST_PROMPTS = PromptConfig(max_history=3, show_genres=False)


def write_pairs(data_dir: str, model_dir: str, out_dir: str, num_users: int = 12, num_negatives: int = 3,
                paths: tuple[str, ...] = ("knowledge", "rerank")) -> list[str]:
    """pairs/<path>.parquet files (recalign.pairs.PAIRS_SCHEMA) under out_dir; returns their paths."""
    from transformers import AutoTokenizer

    from recalign.pairs.heuristic import heuristic_pairs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The pairs stage records its prompt; evaluation, the sweep and Serve read the run's re-rank prompt there.
    io.write_json({"prompt": dataclasses.asdict(TEST_PROMPTS)}, os.path.join(out_dir, "config.json"))
    uris = []
    for seed, path in enumerate(paths):
        uri = os.path.join(out_dir, f"{path}.parquet")
        io.write_parquet(heuristic_pairs(data_dir, tokenizer, path, num_negatives, num_users, seed, TEST_PROMPTS), uri)
        uris.append(uri)
    return uris
