"""The evaluation's reports: metrics.json and metrics.md with the free-generation table, and the plot."""

import json

import numpy as np

from recalign import io
from recalign.data.dataset import SplitArrays
from recalign.evaluation.report import free_generation_table, plot_systems, write_report
from recalign.systems import EvalConfig, evaluate


def _result():
    split = SplitArrays(user_idx=np.arange(3), history=np.zeros((3, 1), dtype=np.int64),
                        history_ratings=np.zeros((3, 1), dtype=np.float32), target=np.ones(3, dtype=np.int64),
                        candidates=np.tile(np.arange(1, 5), (3, 1)), target_index=np.array([0, 1, 2]),
                        position=np.zeros(3, dtype=np.int64))
    scores = {"sasrec": np.eye(4)[[0, 1, 2]], "llm sft": np.eye(4)[[3, 1, 0]]}
    result = evaluate(scores, split, EvalConfig(metrics=("hr@1", "ndcg@10"), num_resamples=50))
    result["systems"]["llm sft"]["free_generation"] = {"valid_ratio": 0.5, "hr@1_all_rows": 0.25,
                                                       "hr@1_valid_rows": 0.5}
    return result


def test_write_report_writes_json_and_markdown_with_the_free_generation_table(tmp_path):
    result = _result()
    table = write_report(result, str(tmp_path / "eval"), "Test-split results on tiny")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == json.loads(json.dumps(result))
    md = (tmp_path / "eval" / "metrics.md").read_text()
    assert md.startswith("# Test-split results on tiny\n\n| system | rows |") and md.endswith(table)
    assert "| llm sft | 0.500 | 0.2500 | 0.5000 |" in table


def test_free_generation_table_is_empty_without_free_answers():
    result = _result()
    del result["systems"]["llm sft"]["free_generation"]
    assert free_generation_table(result) == ""


def test_plot_is_a_png(tmp_path):
    uri = str(tmp_path / "metrics.png")
    plot_systems(_result(), uri)
    assert io.read_bytes(uri)[:8] == b"\x89PNG\r\n\x1a\n"
