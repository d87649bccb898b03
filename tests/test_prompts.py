"""Prompt text matches the data it describes."""

import math

import pandas as pd
import pytest

from recalign import prompts


def _items():
    return pd.DataFrame({
        "title": ["Usual Suspects, The", "Toy Story", "Heat", "Copycat"],
        "year": [1995, 1995, float("nan"), 1995],
        "genres": [["Crime", "Thriller"], ["Animation", "Comedy"], ["Action"], []],
    }, index=pd.Index([1, 2, 3, 4], name="item_idx"))


def test_knowledge_prompt_lists_history_with_counts_and_ratings():
    cfg = prompts.PromptConfig(max_history=2)
    msgs = prompts.knowledge_messages(_items(), [0, 1, 2, 3], [math.nan, 5.0, 4.0, 2.0], cfg)
    user = msgs[-1]["content"]
    assert "the 2 movies" in user  # padding skipped, then the 2 most recent
    assert "1. Toy Story (1995), Animation/Comedy - rated 4/5" in user
    assert "2. Heat, Action - rated 2/5" in user  # unknown year is omitted, not "nan"
    assert "Usual Suspects" not in user
    assert all(w in user for w in ("genres", "eras", "moods", "themes"))


def test_rerank_prompt_letters_and_answer():
    cfg = prompts.PromptConfig(show_ratings=False, show_genres=False)
    msgs = prompts.rerank_messages(_items(), [1, 2], None, [3, 4, 1], cfg)
    user = msgs[-1]["content"]
    assert "Here are 3 candidate movies, labelled A to C:" in user
    assert "A. Heat\nB. Copycat (1995)\nC. The Usual Suspects (1995)" in user
    assert "rated" not in user and "the 2 movies" in user
    assert prompts.rerank_answer(2) == "C", "the answer is the letter the re-ranker scores, nothing after it"


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("**B**", "B"), ("B) Title", "B"), ("Answer: B", "B"), ("[B]", "B"),
    ("C. The Usual Suspects", "C"), (" b) Heat", "B"), ("B\nThe Matrix", "B"), ("B: Heat", "B"),
    ("The answer is B", "B"), ("**B.** Heat", "B"), ("B - Heat", "B"),
])
def test_parse_letter_reads_what_a_model_writes(answer, letter):
    assert prompts.parse_letter(answer, 20) == prompts.LETTERS.index(letter)


@pytest.mark.parametrize("answer", ["I would pick B", "a great choice is C", "B and C", "Apollo 13", "", "AB", "BB",
                                    "A great movie", "a", "C is the one", "B C", "D. Something"])
def test_parse_letter_rejects_answers_that_name_no_single_candidate(answer):
    assert prompts.parse_letter(answer, 3) is None


def test_render_uses_chat_template(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = prompts.render(tok, prompts.rerank_messages(_items(), [1], [3.0], [2, 3], prompts.PromptConfig()))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
