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


def assert_letters_are_first_completion_tokens(tokenizer, prompt: str) -> None:
    """The re-rank completions the trainer encodes are exactly the tokens the re-ranker scores: for every candidate
    letter, the completion is one token, the letter's scoring id, and prompt + letter tokenise as prompt, then it."""
    from recalign.align.logprobs import encode_example
    from recalign.prompts import LETTERS, rerank_answer
    from recalign.rerank.scorer import letter_token_ids

    scored = letter_token_ids(tokenizer, 20)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for position in range(20):
        example = encode_example(tokenizer, prompt, [rerank_answer(position)], 4096, 8, add_eos=False)
        assert example.completion_ids == [[scored[position]]], LETTERS[position]
        joint = tokenizer(prompt + rerank_answer(position), add_special_tokens=False)["input_ids"]
        assert joint == prompt_ids + [scored[position]], f"{LETTERS[position]} merges with the assistant header"
