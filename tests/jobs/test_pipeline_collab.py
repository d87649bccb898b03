"""The re-rank path with collaborative tokens end to end on the tiny model: pairs rendered with <item:N> markers,
SFT and S-DPO training the projector with the LoRA weights (S-DPO from SFT's projector), evaluation scoring the
hybrid policies and the base model's zero-shot with titles only, and the re-run skipping what is done."""

import json

import pipeline
import pytest
import torch
from safetensors.torch import load_file

from recalign.llm.collab import COLLAB_FILE

ARGS = ["preset=smoke", "stages=[data,sasrec,pairs,align,evaluate]", "pairs.paths=[rerank]",
        "policies.paths=[rerank]", "policies.loss_types=[sdpo]", "pairs.prompt.item_tokens=hybrid",
        "sasrec_train.epochs=2", "eval.llm_users=6", "eval.valid_users=4", "policies.rerank.learning_rate=1e-2",
        "policies.rerank.sft_learning_rate=1e-2"]


@pytest.mark.ray
@pytest.mark.slow  # ~2.5 min; the mechanism's unit tests (tests/llm/test_collab.py) run by default
def test_hybrid_prompts_train_a_projector_and_evaluate(ray_local, tmp_path, capsys):
    root = tmp_path / "runs"
    args = ARGS + [f"run.root={root}", f"models_dir={tmp_path / 'models'}"]
    pipeline.main(args)
    run = root / "smoke"
    prompt = json.loads((run / "pairs" / "rerank.parquet").with_name("config.json").read_text())["prompt"]
    assert prompt["item_tokens"] == "hybrid"
    import pyarrow.parquet as pq

    first = pq.read_table(run / "pairs" / "rerank.parquet")["prompt"][0].as_py()
    assert "<item:" in first

    sft, sdpo = (run / "policy" / "rerank" / label for label in ("sft", "sft+sdpo"))
    for policy in (sft, sdpo):
        assert (policy / COLLAB_FILE).is_file() and (policy / "adapter_model.safetensors").is_file(), policy
    sasrec = torch.load(run / "baselines" / "sasrec" / "model.pt", weights_only=False)["state_dict"]
    saved = load_file(sft / COLLAB_FILE)
    torch.testing.assert_close(saved["item_table"], sasrec["item_emb.weight"].float())
    tuned = load_file(sdpo / COLLAB_FILE)
    moved = [k for k in saved if k.startswith("projector.net") and not torch.equal(saved[k], tuned[k])]
    assert moved, "S-DPO trains the projector it starts from"

    systems = json.loads((run / "eval" / "metrics.json").read_text())["systems"]
    assert {"sasrec", "llm zero-shot", "llm sft", "llm sft+sdpo", "fusion"} <= set(systems)
    assert systems["llm sft+sdpo"]["num_rows"] == 6
    assert systems["llm sft+sdpo"]["free_generation"]["valid_ratio"] >= 0.0

    pipeline.main(args)  # nothing changed: every stage is up to date
    out = capsys.readouterr().out
    for name in ("data", "sasrec", "pairs", "policy/rerank/sft", "policy/rerank/sft+sdpo"):
        assert f"[{name}] up to date" in out, name
