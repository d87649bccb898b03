"""Pairs files as the trainer reads them: up to the first K negatives, seeded subsets, bad rows named."""

import pyarrow as pa
import pytest

from recalign import io
from recalign.pairs.read import load_pairs


def test_load_pairs_keeps_up_to_the_first_k_and_names_bad_rows(pairs_uris, tmp_path):
    examples = load_pairs(pairs_uris, num_negatives=2)
    assert len(examples) == 12 and {e.path for e in examples} == {"knowledge", "rerank"}
    full = io.read_parquet(pairs_uris[0]).to_pylist()
    assert examples[0].rejected == full[0]["rejected"][:2], "most-rejected first: the first K are kept"
    subset = load_pairs(pairs_uris, num_negatives=2, max_examples=5, seed=3)
    assert len(subset) == 5 and subset == load_pairs(pairs_uris, num_negatives=2, max_examples=5, seed=3)
    assert [e.prompt for e in subset] == [e.prompt for e in examples if e in subset], "a subset keeps file order"
    assert all(len(e.rejected) == 3 for e in load_pairs(pairs_uris, num_negatives=4)), "rows with fewer keep theirs"
    none = tmp_path / "none.parquet"
    io.write_parquet(pa.table({"user_idx": pa.array([3], pa.int32()), "path": ["knowledge"], "prompt": ["p"],
                               "chosen": ["A"], "rejected": pa.array([[]], pa.list_(pa.string()))}), str(none))
    with pytest.raises(ValueError, match=r"none.parquet: row 0 \(user_idx 3\): no rejected completion"):
        load_pairs([str(none)], 2)
    bad = tmp_path / "bad.parquet"
    io.write_parquet(pa.table({"user_idx": pa.array([7], pa.int32()), "path": ["rerank"], "prompt": [""],
                               "chosen": ["A"], "rejected": [["B"]]}), str(bad))
    with pytest.raises(ValueError, match=r"bad.parquet: row 0 \(user_idx 7\): prompt is empty"):
        load_pairs([str(bad)], 1)
    with pytest.raises(ValueError, match="missing column"):
        io.write_parquet(pa.table({"prompt": ["x"]}), str(bad))
        load_pairs([str(bad)], 1)
