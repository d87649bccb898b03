"""Small alignment settings for the tiny Llama, and readers of what a sweep or a trained policy left behind."""

from __future__ import annotations

import json
import os

# LoRA r=4 on three modules, short prompts and completions, one worker: seconds per step on the tiny model.
SMALL_ALIGN = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, max_prompt_length=128, max_completion_length=48,
                   lora_target_modules=["q_proj", "v_proj", "up_proj"], learning_rate=1e-2, num_workers=1)
# Two workers on every LoRA module, checkpoints every 2 steps: the Ray Train tests (sync, resume, TensorBoard).
TWO_WORKERS = {**SMALL_ALIGN, "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"],
               "learning_rate": 5e-3, "per_device_train_batch_size": 2, "num_workers": 2, "save_steps": 2}
# The sweep trials: 4 examples, batch 2, 1 worker: 2 optimizer steps per epoch, so rung r ends at step 2r.
SWEEP_TRIAL = {k: v for k, v in SMALL_ALIGN.items() if k != "lora_target_modules"} | {
    "max_completion_length": 32, "learning_rate": 5e-3, "per_device_train_batch_size": 2, "save_steps": 50,
    "max_failures": 0}


def adapter_metrics(adapter: str) -> dict:
    """The metrics.json a published policy (or a sweep trial's adapter) carries."""
    with open(os.path.join(adapter, "metrics.json")) as f:
        return json.load(f)


def draw_trials(cfg) -> list[dict]:
    """The trial configs Tune's variant generator draws from a SweepConfig's space, in order."""
    from recalign.align.sweep import _seeded_search, param_space

    search = _seeded_search(cfg.seed)
    search.add_configurations({"t": {"run": lambda config: None, "config": param_space(cfg),
                                     "num_samples": cfg.num_samples}})
    configs = []
    while (trial := search.next_trial()) is not None:
        configs.append(trial.config)
    return configs
