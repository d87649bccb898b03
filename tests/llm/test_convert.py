"""GGUF -> HF folder conversion (a tiny GGUF built in-process; SmolLM2 itself in a slow test) and resolve_model."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from recalign.llm import ModelError, convert_gguf, default_gguf_path, resolve_model
from recalign.llm.convert import MARKER
from tests.helpers import REPO
from tests.helpers.pairs import assert_letters_are_first_completion_tokens


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tests.helpers.gguf import save_tiny_gguf

    return save_tiny_gguf(tmp_path_factory.mktemp("gguf") / "Tiny-Llama.F32.gguf")


def test_conversion_is_exact_and_keeps_template_and_special_tokens(tiny_gguf, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from recalign.llm.tiny import CHAT_TEMPLATE

    gguf_path, reference = tiny_gguf
    out = convert_gguf(gguf_path, tmp_path / "tiny")
    weights = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert sorted(reference) == sorted(weights)
    for name, expected in reference.items():
        np.testing.assert_array_equal(weights[name].numpy(), expected, err_msg=name)  # Q/K un-permuted exactly
    tokenizer = AutoTokenizer.from_pretrained(out)
    # transformers 5.17 maps the GGUF's bos id onto eos; the converter re-reads the ids from the GGUF.
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    config = AutoConfig.from_pretrained(out)
    assert getattr(config, "quantization_config", None) is None and config.tie_word_embeddings
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_conversion_is_idempotent_and_replaces_partial_folders(tiny_gguf, tmp_path):
    gguf_path, _ = tiny_gguf
    out = convert_gguf(gguf_path, tmp_path / "tiny")
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    time.sleep(0.01)
    assert convert_gguf(gguf_path, tmp_path / "tiny") == out
    assert weights.stat().st_mtime_ns == stamp  # second call: nothing rewritten

    (out / MARKER).unlink()  # as if a crash had left a folder without its completion marker
    (out / "junk.txt").write_text("partial")
    convert_gguf(gguf_path, tmp_path / "tiny")
    assert (out / MARKER).is_file() and not (out / "junk.txt").exists()
    marker = json.loads((out / MARKER).read_text())
    assert marker["gguf_sha256"] and marker["dtype"] == "float32"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary siblings left behind


def test_resolve_model(tiny_gguf, tiny_llama_dir, tmp_path):
    gguf_path, _ = tiny_gguf
    assert resolve_model(str(tiny_llama_dir), tmp_path) == str(tiny_llama_dir.resolve())
    converted = resolve_model(str(gguf_path), tmp_path / "models")
    assert converted == str((tmp_path / "models" / "tiny-llama.f32").resolve())
    assert os.path.isfile(os.path.join(converted, "config.json"))
    with pytest.raises(ModelError, match="not converted yet"):
        resolve_model("smollm2", tmp_path / "empty", convert=False)
    with pytest.raises(ModelError, match="nothing is downloaded"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path)
    assert default_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    tiny = resolve_model("tiny", tmp_path / "models")
    assert tiny == str((tmp_path / "models" / "tiny-llama").resolve()) and os.path.isfile(os.path.join(tiny, "config.json"))
    assert resolve_model("tiny", tmp_path / "models") == tiny  # built once, then reused


@pytest.mark.slow
def test_smollm2_conversion_matches_the_gguf_and_speaks_english(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = default_gguf_path()
    out = convert_gguf(gguf_path, tmp_path / "smollm2-135m-instruct")
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).state_dict()
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, quantized[name]), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    answer = model.generate(**ids, do_sample=False, max_new_tokens=20)[0, ids["input_ids"].shape[1]:]
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)
    assert_letters_are_first_completion_tokens(tokenizer, _rerank_prompt(tokenizer))


SMOLLM2 = os.path.join(REPO, "models", "smollm2-135m-instruct")


@pytest.mark.skipif(not os.path.isfile(os.path.join(SMOLLM2, "config.json")),
                    reason="SmolLM2 not converted here yet (make run converts it; the slow test above always does)")
def test_smollm2s_letter_is_the_first_completion_token_with_its_chat_template():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    assert_letters_are_first_completion_tokens(tokenizer, _rerank_prompt(tokenizer))


def _rerank_prompt(tokenizer) -> str:
    from recalign.data.loaders import load_ml100k
    from recalign.prompts import PromptConfig, render, rerank_messages

    items = load_ml100k().items.head(40).assign(item_idx=range(1, 41)).set_index("item_idx")
    return render(tokenizer, rerank_messages(items, [1, 2, 3], [5.0, 4.0, 3.0], list(range(10, 30)),
                                             PromptConfig(max_history=10, show_genres=False)))
