"""A LoRA adapter with a projector (collab.safetensors) on the tiny Llama, as a hybrid-prompt policy publishes."""

from __future__ import annotations

import torch


def lora_model(model_dir, seed: int = 0, target_modules=("q_proj", "v_proj")):
    """The tiny Llama with a random (non-zero) LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=list(target_modules))
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)


def save_collab_adapter(model_dir, num_items: int, out_dir, seed: int = 0, item_dim: int = 8):
    """A CollabLM over a random item table of `num_items` (+ padding), its projector moved off its initial
    weights, saved to `out_dir` (adapter + collab.safetensors). Returns the model."""
    from recalign.llm.collab import CollabLM

    table = torch.randn(num_items + 1, item_dim, generator=torch.Generator().manual_seed(seed))
    model = CollabLM.fresh(lora_model(model_dir, seed), table, seed=seed)
    with torch.no_grad():
        model.projector.net[0].weight.add_(0.5)  # as if trained: not what a fresh projector would be
    model.save_pretrained(str(out_dir))
    return model.eval()
