"""Collaborative tokens: prompts with <item:N> markers, the projector, CollabLM's forward, generate, save and load,
gradients into both the projector and the LoRA weights, and the packed log-probs over such prompts."""

import functools

import numpy as np
import pytest
import torch

from recalign.align.logprobs import collate, encode_example, naive_logps, packed_logps
from recalign.llm.collab import COLLAB_FILE, CollabLM, encode_prompt, encode_prompts, has_projector, prompt_for
from recalign.llm.policy import load_policy
from recalign.prompts import PromptConfig, item_marker, render, rerank_messages
from recalign.rerank.scorer import LetterScorer, RerankConfig, build_prompts, letter_token_ids
from tests.helpers.collab import lora_model, save_collab_adapter

TEXT = PromptConfig(max_history=5, show_genres=False)
HYBRID = PromptConfig(max_history=5, show_genres=False, item_tokens="hybrid")
IDS = PromptConfig(max_history=5, show_genres=False, item_tokens="ids")
NUM_ITEMS, ITEM_DIM = 40, 8


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return load_policy(str(tiny_llama_dir))[1]


@pytest.fixture(scope="module")
def item_table():
    table = torch.randn(NUM_ITEMS + 1, ITEM_DIM, generator=torch.Generator().manual_seed(3)) * 0.3
    table[0] = 0
    return table


def test_prompts_mark_items_after_titles_or_alone(ml100k_dir, tokenizer):
    from recalign.data.dataset import Dataset

    data = Dataset(ml100k_dir)
    split = data.split("test")
    history, candidates = split.history[0], split.candidates[0]
    texts = {p.item_tokens: rerank_messages(data.items, history, split.history_ratings[0], candidates, p)[1]["content"]
             for p in (TEXT, HYBRID, IDS)}
    assert "<item:" not in texts["none"]
    first = int(candidates[0])
    assert f"A. {item_marker(first)}\n" in texts["ids"] and f" {item_marker(first)}\n" in texts["hybrid"]
    assert texts["hybrid"].replace(f" {item_marker(first)}", "").count("<item:") == len(candidates) - 1 + min(
        5, int((history != 0).sum())), "one token per shown history item and per candidate"
    title = texts["none"].split("A. ")[1].split("\n")[0]
    assert title in texts["hybrid"] and title not in texts["ids"]
    lengths = {k: len(encode_prompt(tokenizer, v)) for k, v in texts.items()}
    assert lengths["ids"] < lengths["none"] / 2 and lengths["none"] < lengths["hybrid"], lengths
    with pytest.raises(ValueError, match="item_tokens must be one of"):
        PromptConfig(item_tokens="soft")


def test_encode_prompt_puts_negative_item_ids_where_the_markers_were(tokenizer):
    plain = "1. Toy Story (1995) - rated 5/5"
    assert encode_prompt(tokenizer, plain) == tokenizer(plain, add_special_tokens=False)["input_ids"]
    ids = encode_prompt(tokenizer, f"A. Heat {item_marker(7)}\nB. {item_marker(12)}")
    assert [i for i in ids if i < 0] == [-7, -12]
    text_ids = tokenizer("A. Heat ", add_special_tokens=False)["input_ids"]
    assert ids[:len(text_ids)] == text_ids and ids[len(text_ids)] == -7
    with pytest.raises(ValueError, match="start at 1"):
        encode_prompt(tokenizer, item_marker(0))
    batch = encode_prompts(tokenizer, ["short", f"a longer {item_marker(3)} prompt"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0, 0] == 0 and batch["input_ids"][1].min() == -3, "left-padded"


def test_collab_forward_embeds_items_through_the_projector(tiny_llama_dir, tokenizer, item_table):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    model = CollabLM.fresh(base, item_table, seed=0).eval()
    embeddings = base.get_input_embeddings().weight
    soft = model.projector(item_table[1:])
    assert soft.pow(2).mean().sqrt().item() == pytest.approx(embeddings.pow(2).mean().sqrt().item(), rel=1e-3), \
        "an untrained projector writes tokens of the LM's own size"
    ids = torch.tensor([[5, 6, -3, 7, -9]])
    embeds = model.embed(ids)
    torch.testing.assert_close(embeds[0, 2], model.projector(item_table[3]))
    torch.testing.assert_close(embeds[0, [0, 1, 3]], embeddings[[5, 6, 7]])
    text_only = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=text_only).logits, base(input_ids=text_only).logits)
    with pytest.raises(ValueError, match="beyond the item table"):
        model.embed(torch.tensor([[-(NUM_ITEMS + 1)]]))


def test_gradients_reach_the_projector_and_the_lora_weights(tiny_llama_dir, tokenizer, item_table):
    model = CollabLM.fresh(lora_model(tiny_llama_dir), item_table, seed=0)
    prompt = f"<|im_start|>user\nA. {item_marker(4)}\nB. {item_marker(9)}<|im_end|>\n<|im_start|>assistant\n"
    batch = collate([encode_example(tokenizer, prompt, ["A", "B"], 256, 4, add_eos=False)], tokenizer.pad_token_id)
    assert batch.prompt_ids.min() < 0
    packed_logps(model, **batch.tensors())[:, 0].sum().backward()
    projector = [p.grad for p in model.projector.parameters()]
    lora = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert projector and all(g is not None and g.abs().sum() > 0 for g in projector)
    assert lora and all(g is not None for g in lora) and sum(g.abs().sum() for g in lora) > 0
    base = [p for n, p in model.named_parameters() if "lora_" not in n and "projector" not in n]
    assert all(not p.requires_grad for p in base), "the LLM's own weights stay frozen"


def test_packed_log_probs_match_full_sequences_with_item_tokens(tiny_llama_dir, tokenizer, item_table):
    model = CollabLM.fresh(lora_model(tiny_llama_dir), item_table, seed=1).eval()
    prompts = [f"<|im_start|>user\n1. {item_marker(2)}\nA. {item_marker(5)}<|im_end|>\n<|im_start|>assistant\n",
               f"<|im_start|>user\nHeat {item_marker(30)}<|im_end|>\n<|im_start|>assistant\n"]
    batch = collate([encode_example(tokenizer, p, ["A", "B", "C"], 256, 4, add_eos=False) for p in prompts],
                    tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(packed_logps(model, **batch.tensors()), naive_logps(model, **batch.tensors()),
                                   rtol=1e-4, atol=1e-4)


def test_saved_projector_loads_for_inference_and_scores_the_same(tiny_llama_dir, tokenizer, item_table, tmp_path,
                                                                  ml100k_dir):
    from recalign.data.dataset import Dataset

    data = Dataset(ml100k_dir)
    trained = save_collab_adapter(tiny_llama_dir, data.num_items, tmp_path, seed=2)
    assert (tmp_path / COLLAB_FILE).exists() and (tmp_path / "adapter_model.safetensors").exists()
    assert has_projector(str(tmp_path)) and not has_projector(None) and not has_projector(str(tiny_llama_dir))

    loader = functools.partial(load_policy, str(tiny_llama_dir), str(tmp_path))
    model, _ = loader()
    assert isinstance(model, CollabLM)
    texts = build_prompts(data, "test", np.array([0, 1]), tokenizer, HYBRID)
    scorer = LetterScorer(loader, 20, RerankConfig(batch_size=2, max_new_tokens=2))
    out = scorer({"row": np.array([0, 1]), "prompt": np.array(texts, dtype=object)})
    ids = letter_token_ids(tokenizer, 20)
    for i, text in enumerate(texts):  # the training-side wrapper (PEFT, unmerged) on one unpadded prompt
        with torch.no_grad():
            last = trained(input_ids=torch.tensor([encode_prompt(tokenizer, text)])).logits[0, -1]
        np.testing.assert_allclose(out["letter_logits"][i], last[ids].numpy(), rtol=1e-3, atol=1e-3)
    assert all(isinstance(a, str) for a in out["answer"]), "generate runs on embeddings and decodes new tokens"

    plain = LetterScorer(functools.partial(load_policy, str(tiny_llama_dir)), 20, RerankConfig(batch_size=2))
    with pytest.raises(ValueError, match="no projector"):
        plain({"row": np.array([0]), "prompt": np.array(texts[:1], dtype=object)})
    assert prompt_for(HYBRID, False).item_tokens == "none" and prompt_for(HYBRID, True) == HYBRID


def test_generate_returns_the_prompt_then_the_new_tokens(tiny_llama_dir, tokenizer, item_table):
    from transformers import AutoModelForCausalLM

    model = CollabLM.fresh(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), item_table).eval()
    text = render(tokenizer, [{"role": "user", "content": f"Pick one: A. {item_marker(3)}"}])
    enc = encode_prompts(tokenizer, [text])
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=tokenizer.pad_token_id)
    width = enc["input_ids"].shape[1]
    assert out.sequences.shape[1] > width and (out.sequences[:, :width] >= 0).all()
