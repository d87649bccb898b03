"""An LLM policy as inference code loads it: the base causal LM, with a LoRA adapter merged in."""

from __future__ import annotations

import os

from recalign import io
from recalign.llm.store import fingerprint, local_model


def model_fingerprint(model_path: str) -> str:
    """A stable hash of a model folder (local, or published on shared storage): its config and the names and
    sizes of its files (cache keys)."""
    return fingerprint(model_path)


def load_policy(model_path: str, adapter_path: str | None = None, dtype: str = "float32"):
    """(model, tokenizer): the base causal LM, with a LoRA adapter merged in when given, wrapped in a
    `recalign.llm.collab.CollabLM` when the adapter was trained with collaborative tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = local_model(model_path)  # a model on shared storage: this node's cached copy
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    if adapter_path:
        from peft import PeftModel

        from recalign.llm.collab import COLLAB_FILE, CollabLM

        with io.local_copy(adapter_path) as local:  # the adapter may sit in s3:// run storage
            model = PeftModel.from_pretrained(model, local).merge_and_unload()
            if os.path.exists(os.path.join(local, COLLAB_FILE)):  # trained with collaborative tokens
                model = CollabLM.load(model, local)
    return model.eval(), tokenizer
