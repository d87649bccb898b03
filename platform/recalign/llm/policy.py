"""An LLM policy as inference code loads it: the base causal LM, with a LoRA adapter merged in."""

from __future__ import annotations

from recalign import io


def model_fingerprint(model_path: str) -> str:
    """A stable hash of a local model folder: its config and the names and sizes of its files (cache keys)."""
    import hashlib
    import os

    config = io.read_bytes(io.join(os.path.abspath(model_path), "config.json"))
    listing = sorted((name, os.path.getsize(os.path.join(model_path, name))) for name in os.listdir(model_path)
                     if os.path.isfile(os.path.join(model_path, name)))
    return hashlib.sha256(config + repr(listing).encode()).hexdigest()[:16]


def load_policy(model_path: str, adapter_path: str | None = None, dtype: str = "float32"):
    """(model, tokenizer): the base causal LM, with a LoRA adapter merged in when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    if adapter_path:
        from peft import PeftModel

        with io.local_copy(adapter_path) as local:  # the adapter may sit in s3:// run storage
            model = PeftModel.from_pretrained(model, local).merge_and_unload()
    return model.eval(), tokenizer
