"""The seed spread between runs: values per run, range and CI, comparisons per run, and refusals."""

import json

import pytest
import spread

from recalign.config import ConfigError
from recalign.evaluation.spread import comparison_spread, spread_rows, spread_table


def _summary(sasrec: float, sft: float, rows: int = 32, low: float = 0.1) -> dict:
    def entry(mean: float, n: int) -> dict:
        return {"num_rows": n, "ndcg@10": {"mean": mean, "low": mean - low, "high": mean + low}}

    return {"systems": {"sasrec": entry(sasrec, 943), "llm sft": entry(sft, rows)},
            "comparisons": [{"system": "llm sft", "baseline": "llm zero-shot", "metric": "ndcg@10",
                             "diff": sft - 0.2, "low": sft - 0.25, "high": sft - 0.15}]}


def test_spread_rows_give_the_range_the_sd_and_the_widest_ci():
    rows = spread_rows({"s0": _summary(0.72, 0.30), "s1": _summary(0.70, 0.26, low=0.2), "s2": _summary(0.71, 0.28)})
    sasrec = next(r for r in rows if r["system"] == "sasrec")
    assert sasrec["values"] == {"s0": 0.72, "s1": 0.70, "s2": 0.71}
    assert sasrec["range"] == pytest.approx(0.02) and sasrec["std"] == pytest.approx(0.01)
    assert sasrec["ci_width"] == pytest.approx(0.4), "the widest run's CI"
    compared = comparison_spread({"s0": _summary(0.72, 0.30), "s1": _summary(0.70, 0.21)})
    assert compared[0]["diffs"] == pytest.approx({"s0": 0.10, "s1": 0.01})
    assert compared[0]["significant"] == {"s0": True, "s1": False}


def test_spread_refuses_one_run_or_runs_on_other_rows():
    with pytest.raises(ValueError, match="at least 2 runs"):
        spread_rows({"s0": _summary(0.7, 0.3)})
    with pytest.raises(ValueError, match=r"llm sft: scored on \[32, 40\] rows"):
        spread_rows({"s0": _summary(0.7, 0.3), "s1": _summary(0.7, 0.3, rows=40)})


def test_the_job_reads_each_runs_metrics_and_writes_the_table(tmp_path, capsys):
    for name, (a, b) in {"demo": (0.72, 0.30), "demo-seed1": (0.70, 0.21)}.items():
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "eval" / "metrics.json").write_text(json.dumps(_summary(a, b)))
    out = tmp_path / "spread.md"
    table = spread.main([f"root={tmp_path}", "runs=[demo,demo-seed1]", f"out={out}"])
    assert out.read_text() == table == spread_table({"demo": _summary(0.72, 0.30), "demo-seed1": _summary(0.70, 0.21)})
    assert "| sasrec | 943 | 0.7200 | 0.7000 | 0.0200 |" in table and "| llm sft | llm zero-shot | +0.1000* | +0.0100 |" \
        in table
    with pytest.raises(FileNotFoundError, match="nope/eval/metrics.json: missing"):
        spread.main([f"root={tmp_path}", "runs=[demo,nope]"])
    with pytest.raises(ConfigError, match="name at least 2 runs"):
        spread.main([f"root={tmp_path}", "runs=[demo]"])
