"""Heuristic pairs from the data alone follow the pairs schema."""

from recalign.pairs.build import PAIRS_SCHEMA
from recalign.pairs.heuristic import heuristic_pairs
from tests.helpers.pairs import TEST_PROMPTS


def test_heuristic_pairs_follow_the_schema(ml100k_dir, tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for path in ("knowledge", "rerank"):
        table = heuristic_pairs(ml100k_dir, tokenizer, path, num_negatives=3, num_users=5, prompt_cfg=TEST_PROMPTS)
        assert table.schema.equals(PAIRS_SCHEMA) and table.num_rows == 5
        rows = table.to_pylist()
        assert {r["path"] for r in rows} == {path}
        assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)
        assert all(len(r["rejected"]) == 3 and r["chosen"] not in r["rejected"] for r in rows)
        assert len({r["user_idx"] for r in rows}) == 5
