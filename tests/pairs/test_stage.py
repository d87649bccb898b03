"""The pairs stage on a tiny run: the re-rank pairs, the sliding-window SFT set beside them when configured
(and none left behind when not), and which of them the SFT policy trains on."""

from __future__ import annotations

from recalign import io
from recalign.pairs.build import PairsConfig, WindowsConfig
from recalign.pairs.read import load_pairs
from recalign.pairs.stage import SFT_SET, pairs_stage, sft_pairs
from tests.helpers.data import tiny_run


def test_pairs_stage_writes_the_sft_set_and_the_sft_policy_reads_it(tmp_path, tiny_llama_dir, monkeypatch):
    from recalign.data.dataset import Dataset
    from recalign.pairs import stage

    loads = []
    monkeypatch.setattr(stage, "_tokenizer", lambda path, load=stage._tokenizer: loads.append(path) or load(path))
    run = tiny_run(tmp_path)
    cfg = PairsConfig(paths=["rerank"], negatives="random", model=str(tiny_llama_dir),
                      windows=WindowsConfig(per_user=3))
    summary = pairs_stage(run, cfg, log=lambda _: None)
    assert len(loads) == 1, "one tokenizer for the re-rank pairs and the SFT set"

    lengths = [len(s) for s in Dataset(run.dir("data")).train_sequences()]
    assert summary["rerank_sft"]["kept"] == sum(min(3, n - 3) for n in lengths)  # targets after >= 3 items
    assert sft_pairs(run) == run.dir("pairs", SFT_SET)
    windows = load_pairs([sft_pairs(run)], num_negatives=100)
    assert {len(e.rejected) for e in windows} == {19}, "the listwise softmax sees all C letters"
    assert load_pairs([run.dir("pairs", "rerank.parquet")], 100)[0].rejected.__len__() == 3

    off = PairsConfig(paths=["rerank"], negatives="random", model=str(tiny_llama_dir))
    summary = pairs_stage(run, off, log=lambda _: None)
    assert "rerank_sft" not in summary and not io.exists(run.dir("pairs", SFT_SET)), "no stale SFT set"
    assert sft_pairs(run) == run.dir("pairs", "rerank.parquet")
