"""Shared-prompt log-probs: same values and gradients as K+1 full sequences, and as an unpadded forward."""

import pytest
import torch

from recalign.align.logprobs import (SCORERS, CompletionBatch, EncodedExample, PolicyScorer, collate, encode_example,
                                     kv_cache_logps, naive_logps, packed_logps)

HEADER = "<|im_start|>assistant\n"
PROMPTS = [
    "<|im_start|>user\nThe user enjoys dramas and thrillers from the nineties.<|im_end|>\n" + HEADER,
    "<|im_start|>system\nAnalyse the user's preferences.<|im_end|>\n<|im_start|>user\nRated 5 out of 5.<|im_end|>\n"
    + HEADER,
    "<|im_start|>user\nA B C<|im_end|>\n" + HEADER,
]
COMPLETIONS = [
    ["Toy Story (1995)", "GoldenEye", "Genres: Action, Adventure, Animation, Comedy", "Four Rooms"],
    ["A", "Candidates A B C D E F G H", "Drama", "Movies: Toy Story (1995), Copycat (1995)."],
    ["C. Copycat (1995)", "B", "Film-Noir, Horror, Musical, Mystery", ""],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def lora_model(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), lora)


@pytest.fixture(scope="module")
def batch(tokenizer) -> CompletionBatch:
    examples = [encode_example(tokenizer, p, c, 512, 64) for p, c in zip(PROMPTS, COMPLETIONS)]
    return collate(examples, tokenizer.pad_token_id)


def test_encode_appends_eos_and_truncates(tokenizer):
    eos = tokenizer.eos_token_id
    example = encode_example(tokenizer, PROMPTS[0], ["Toy Story (1995)", ""], 512, 64)
    assert example.prompt_ids == tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert example.completion_ids[0][-1] == eos and example.completion_ids[1] == [eos]
    short = encode_example(tokenizer, PROMPTS[0], ["Genres: Action, Adventure, Animation, Comedy"], 5, 3)
    assert short.prompt_ids == example.prompt_ids[-5:], "long prompts keep their end (the assistant header)"
    assert len(short.completion_ids[0]) == 3 and short.completion_ids[0][-1] != eos
    letter = encode_example(tokenizer, PROMPTS[0], ["C"], 512, 64, add_eos=False)
    assert letter.completion_ids == [tokenizer("C", add_special_tokens=False)["input_ids"]], "a letter takes no EOS"
    with pytest.raises(ValueError, match="encodes to no token"):
        encode_example(tokenizer, PROMPTS[0], [""], 512, 64, add_eos=False)


def test_collate_pads_prompts_left_and_completions_right():
    examples = [EncodedExample([5, 6, 7], [[1, 2], [3]]), EncodedExample([8], [[4], [9, 9, 9]])]
    b = collate(examples, pad_token_id=0)
    assert b.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b.completion_ids.tolist() == [[[1, 2, 0], [3, 0, 0]], [[4, 0, 0], [9, 9, 9]]]
    assert b.completion_mask.sum().item() == 7
    assert b.sequence_tokens() == 2 * 3 + 2 * 1 + 7
    assert collate(examples, 0, num_completions=1).completion_ids.shape == (2, 1, 2)
    assert b.present().tolist() == [[True, True], [True, True]]
    # Up to K: a row with fewer rejected completions is padded with empty ones, which present() reports.
    uneven = collate([EncodedExample([5], [[1], [2], [3]]), EncodedExample([6], [[4], [5]])], 0)
    assert uneven.completion_ids.shape == (2, 3, 1) and uneven.present().tolist() == [[True] * 3, [True, True, False]]
    assert collate([EncodedExample([5], [[1]])], 0, num_completions=4).present().tolist() == [[True, False, False,
                                                                                                 False]]


def _unpadded_logps(model, example: EncodedExample) -> list[float]:
    """Ground truth: each prompt + completion as its own unpadded sequence, full log-softmax."""
    out = []
    for completion in example.completion_ids:
        ids = torch.tensor([example.prompt_ids + completion])
        logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        token = logprobs.gather(-1, targets[:, None])[:, 0]
        out.append(token[len(example.prompt_ids) - 1:].sum().item())
    return out


@pytest.mark.parametrize("mode", ["packed", "kv_cache", "none"])
def test_every_mode_equals_an_unpadded_forward(mode, lora_model, batch, tokenizer):
    lora_model.eval()
    with torch.no_grad():
        logps = SCORERS[mode](lora_model, **batch.tensors())
        truth = torch.tensor([_unpadded_logps(lora_model, encode_example(tokenizer, p, c, 512, 64))
                              for p, c in zip(PROMPTS, COMPLETIONS)])
    assert logps.shape == (3, 4) and (logps < 0).all()
    torch.testing.assert_close(logps, truth, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["packed", "kv_cache"])
def test_shared_prompt_gradients_equal_naive(mode, lora_model, batch):
    """The prompt is encoded once yet stays in the graph: LoRA weights on prompt positions get gradient from every
    completion. (A detached prompt, or completions seeing each other, would make the gradients differ.)"""
    lora_model.train()
    params = [p for p in lora_model.parameters() if p.requires_grad]
    weights = torch.linspace(0.5, 2.0, 12).reshape(3, 4)  # a loss that depends on every completion differently
    shared_grads = torch.autograd.grad((SCORERS[mode](lora_model, **batch.tensors()) * weights).sum(), params)
    naive_grads = torch.autograd.grad((naive_logps(lora_model, **batch.tensors()) * weights).sum(), params)
    assert all(g.abs().sum() > 0 for g in shared_grads)
    for shared, naive in zip(shared_grads, naive_grads):
        torch.testing.assert_close(shared, naive, rtol=1e-4, atol=1e-5)


def test_packed_completions_do_not_see_each_other(lora_model, tokenizer):
    """Changing the chosen completion (packed first) leaves the rejected one (packed after it) unchanged."""
    lora_model.eval()

    def score(completions):
        example = encode_example(tokenizer, PROMPTS[0], completions, 512, 64)
        with torch.no_grad():
            return packed_logps(lora_model, **collate([example], tokenizer.pad_token_id).tensors())[0]

    a, b = score(["Drama", "Comedy"]), score(["Western, War", "Comedy"])
    assert a[1].item() == pytest.approx(b[1].item(), abs=1e-5)
    assert abs(a[0].item() - b[0].item()) > 1e-3


def test_policy_scorer_dispatches(lora_model, batch):
    lora_model.eval()
    with torch.no_grad():
        outputs = [PolicyScorer(lora_model, mode)(**batch.tensors()) for mode in ("packed", "kv_cache", "none")]
    torch.testing.assert_close(outputs[0], outputs[2], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(outputs[1], outputs[2], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="prompt_sharing"):
        PolicyScorer(lora_model, "shared")


def test_reference_is_the_base_model(lora_model, batch, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from recalign.align.loop import reference_logps

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lora_model.eval()
    with torch.no_grad():
        expected = kv_cache_logps(base, **batch.tensors())
        policy = packed_logps(lora_model, **batch.tensors())
    reference = reference_logps(lora_model, batch)
    assert not reference.requires_grad
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-4)
    assert (reference - policy).abs().max() > 1e-3, "the adapter is back on after the reference pass"
