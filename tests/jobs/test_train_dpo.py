"""jobs/train_dpo.py end to end on the embedded Ray: synthetic pairs, every loss type, SFT warm-up."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.ray


def test_job_trains_on_both_paths(ray_local, tiny_llama_dir, tmp_path):
    """jobs/train_dpo.py end to end on the embedded Ray: synthetic pairs for both paths, 2 workers, DMPO."""
    import train_dpo

    run = [f"run.root={tmp_path}", "run.name=t", f"model={tiny_llama_dir}", "loss_types=[dmpo]",
           "synthetic_pairs.enabled=true", "synthetic_pairs.num_users=6", "synthetic_pairs.num_negatives=3",
           "prompt.max_history=3", "align.num_negatives=2", "align.max_steps=2", "align.precompute_ref_log_probs=true",
           "align.lora_r=4", "align.lora_alpha=8", "align.max_prompt_length=96", "align.max_completion_length=32",
           "align.per_device_train_batch_size=2"]
    summaries = train_dpo.main(run)
    out_dir = tmp_path / "t" / "policy" / "dmpo"
    assert summaries["dmpo"]["examples"] == 12 and summaries["dmpo"]["steps"] == 2
    assert (out_dir / "adapter_model.safetensors").exists() and (out_dir / "_stage.json").exists()
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["config"]["precompute_ref_log_probs"] and metrics["num_negatives"] == 2
    assert {p.split("/")[-1] for p in metrics["pairs"]} == {"knowledge.parquet", "rerank.parquet"}
    marker_mtime = (out_dir / "_stage.json").stat().st_mtime
    again = train_dpo.main(run)  # up to date: skipped
    assert again["dmpo"]["steps"] == 2 and (out_dir / "_stage.json").stat().st_mtime == marker_mtime


@pytest.mark.slow
@pytest.mark.parametrize("prompt_sharing", ["packed", "none"])
def test_job_trains_every_loss_type_with_sft_warmup(ray_local, tiny_llama_dir, tmp_path, prompt_sharing):
    """All three losses in one job, K=3, an SFT warm-up first (reference = the warmed-up policy)."""
    import train_dpo

    summaries = train_dpo.main([
        f"run.root={tmp_path}", "run.name=t", f"model={tiny_llama_dir}", "loss_types=[dpo,dmpo,sdpo]",
        "synthetic_pairs.enabled=true", "synthetic_pairs.num_users=8", "synthetic_pairs.num_negatives=3",
        "prompt.max_history=3", "align.num_negatives=3", "align.max_steps=3", "align.sft_max_steps=2",
        f"align.prompt_sharing={prompt_sharing}", "align.lora_r=4", "align.lora_alpha=8", "align.learning_rate=5e-3",
        "align.lora_dropout=0.0", "align.max_prompt_length=96", "align.max_completion_length=32",
        "align.per_device_train_batch_size=2"])
    assert set(summaries) == {"dpo", "dmpo", "sdpo"}
    for loss_type, summary in summaries.items():
        metrics = json.loads((tmp_path / "t" / "policy" / loss_type / "metrics.json").read_text())
        assert metrics["steps"] == 5 and metrics["sft_steps"] == 2
        assert [h["phase"] for h in metrics["history"]] == ["sft"] * 2 + ["preference"] * 3
        first = metrics["history"][2]
        # the reference is the SFT policy and the adapter starts there: the first preference step sees zero rewards
        assert first["rewards_chosen"] == pytest.approx(0.0, abs=1e-5)
        assert first["loss"] == pytest.approx(np.log(2) if loss_type != "sdpo" else np.log(4), abs=1e-4)
