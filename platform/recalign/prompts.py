"""Prompts shared by sampling, preference pairs, alignment and re-ranking.

Two kinds, both rendered with the model's own chat template:
- `knowledge`: the user's history (titles, years, genres, ratings) and a request to analyse the
  user's preferences by genre, era, mood and themes (RLRF4Rec / KAR style).
- `rerank`: the history plus the candidates tagged with letters (A, B, ...); the answer is one
  letter and its title (LlamaRec / S-DPO style). The first answer token is the letter, so a
  single forward pass can score every candidate by its letter's logit.
The wording states the real counts (history and candidates), never a fixed "10 titles".
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from recalign.config import option

LETTERS = string.ascii_uppercase

# An item's collaborative (soft) token in a re-rank prompt: recalign.llm.collab embeds it from the item's
# recommender embedding; the text never reaches a tokenizer as such.
ITEM_PATTERN = re.compile(r"<item:(\d+)>")
ITEM_TOKENS = ("none", "hybrid", "ids")

SYSTEM = "You are an expert movie recommender who reads viewing histories carefully."


@dataclass
class PromptConfig:
    max_history: int = option(20, "most recent items shown in a prompt (<= the protocol's history_len)")
    show_ratings: bool = option(True, "each history item shows the user's rating")
    show_genres: bool = option(True, "each item shows its genres (prompts about twice as long)")
    item_tokens: str = option("none", "re-rank prompts: none (titles) | hybrid (a collaborative token after each "
                                      "title, LLaRA) | ids (collaborative tokens and letters, no titles)")

    def __post_init__(self) -> None:
        if self.item_tokens not in ITEM_TOKENS:
            raise ValueError(f"item_tokens must be one of {list(ITEM_TOKENS)}, got {self.item_tokens!r}")


def item_marker(item_idx: int) -> str:
    return f"<item:{int(item_idx)}>"


# MovieLens writes "Usual Suspects, The"; a language model reads "The Usual Suspects" far better.
_TRAILING_ARTICLE = re.compile(r"^(?P<title>.+?), (?P<article>The|A|An|Les|La|Le|L'|Il|Das|Der|Die|El)"
                               r"(?P<rest> \(.*\))?$")


def display_title(title: str) -> str:
    match = _TRAILING_ARTICLE.match(title)
    if not match:
        return title
    article = match["article"]
    joiner = "" if article.endswith("'") else " "
    return f"{article}{joiner}{match['title']}{match['rest'] or ''}"


def describe_item(items: pd.DataFrame, item_idx: int, show_genres: bool = True) -> str:
    """'Title (1995), Drama/Thriller' from the items frame indexed by item_idx."""
    row = items.loc[int(item_idx)]
    text = display_title(str(row["title"]))
    year = row.get("year")
    if year is not None and not (isinstance(year, float) and math.isnan(year)) and not pd.isna(year):
        text += f" ({int(year)})"
    genres = row.get("genres")
    if show_genres and genres is not None and len(genres):
        text += ", " + "/".join(str(g) for g in genres)
    return text


def item_text(items: pd.DataFrame, item_idx: int, cfg: PromptConfig) -> str:
    """An item as a prompt shows it: its description, then its collaborative token (hybrid), or that alone (ids)."""
    if cfg.item_tokens == "ids":
        return item_marker(item_idx)
    text = describe_item(items, item_idx, cfg.show_genres)
    return f"{text} {item_marker(item_idx)}" if cfg.item_tokens == "hybrid" else text


def history_lines(items: pd.DataFrame, history: Sequence[int], ratings: Sequence[float] | None,
                  cfg: PromptConfig) -> list[str]:
    """One line per watched item, oldest first; padding (0) is skipped."""
    pairs = [(int(i), None if ratings is None else ratings[k]) for k, i in enumerate(history) if int(i) != 0]
    pairs = pairs[-cfg.max_history:]
    lines = []
    for n, (item, rating) in enumerate(pairs, start=1):
        line = f"{n}. {item_text(items, item, cfg)}"
        if cfg.show_ratings and rating is not None and not math.isnan(float(rating)):
            line += f" - rated {float(rating):g}/5"
        lines.append(line)
    return lines


def knowledge_messages(items: pd.DataFrame, history: Sequence[int], ratings: Sequence[float] | None,
                       cfg: PromptConfig) -> list[dict[str, str]]:
    """The sampling prompt; always titles (an analysis is generated as text, no collaborative token)."""
    lines = history_lines(items, history, ratings, dataclasses.replace(cfg, item_tokens="none"))
    user = (
        f"Here are the {len(lines)} movies a user watched most recently, oldest first"
        + (", with the user's ratings" if cfg.show_ratings else "") + ":\n"
        + "\n".join(lines)
        + "\n\nAnalyse this user's movie preferences. Describe in one short paragraph the genres, eras, "
          "moods and themes the user likes and dislikes, so that a recommender can pick their next movie."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def rerank_messages(items: pd.DataFrame, history: Sequence[int], ratings: Sequence[float] | None,
                    candidates: Sequence[int], cfg: PromptConfig) -> list[dict[str, str]]:
    if len(candidates) > len(LETTERS):
        raise ValueError(f"rerank prompt supports at most {len(LETTERS)} candidates, got {len(candidates)}")
    lines = history_lines(items, history, ratings, cfg)
    options = [f"{LETTERS[i]}. {item_text(items, c, cfg)}" for i, c in enumerate(candidates)]
    user = (
        f"Here are the {len(lines)} movies a user watched most recently, oldest first"
        + (", with the user's ratings" if cfg.show_ratings else "") + ":\n"
        + "\n".join(lines)
        + f"\n\nHere are {len(candidates)} candidate movies, labelled {LETTERS[0]} to {LETTERS[len(candidates) - 1]}:\n"
        + "\n".join(options)
        + "\n\nWhich candidate will the user watch next? Answer with the letter of exactly one candidate"
        + ("." if cfg.item_tokens == "ids" else ", then its title.")
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def rerank_answer(position: int) -> str:
    """The completion naming candidate `position`: its letter alone ('C'), the token the re-ranker scores."""
    return LETTERS[position]


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    """The chat-template text up to and including the assistant header (generation prompt)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# A free answer names a candidate when it is that letter alone, perhaps wrapped ("(B)", "**B**", "[B]"), after an
# "Answer:" lead, followed by nothing or by punctuation and a title ("B.", "B) Title", "B: Title", "B - Title").
# Anything else ("I would pick B", "a great choice is C", "B and C", "Apollo 13") names no candidate. A lowercase
# letter counts only when punctuation or a wrapper marks it as a label ("b)", "(b)"): a bare "a" is a word.
_ANSWER = re.compile(r"""^\s*(?P<lead>(?:the\s+)?answer\s*(?:is)?\s*[:\-]?\s*)?
                      (?P<open>[*_\s]*[(\[]?[*_]*)(?P<letter>[A-Z])(?P<close>[*_]*[)\]]?[*_]*)
                      (?P<end>\s*$|[ \t]*\n|\s*[.):,;]|\s+[-\u2013\u2014]\s)""", re.IGNORECASE | re.VERBOSE)


def parse_letter(answer: str, num_candidates: int) -> int | None:
    """The candidate a free-form answer names, or None when it names none, several, or one out of range.

    ValidRatio counts the answers that name exactly one candidate (S-DPO, LLaRA), so a sentence that merely
    contains a letter is not an answer.
    """
    match = _ANSWER.match(answer)
    if not match:
        return None
    letter = match["letter"]
    marked = match["lead"] or match["open"].strip() or match["close"] or match["end"].strip()
    if not letter.isupper() and not marked:
        return None
    position = LETTERS.index(letter.upper())
    return position if position < num_candidates else None
