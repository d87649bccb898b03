"""The torch-only parts on CUDA in bfloat16, against float32 on the CPU: packed log-probs, the listwise SFT loss
and its gradients into LoRA, letter scoring, and the projector of collaborative tokens forward and backward.
Skipped where no GPU is present (this repo's CI has none); benchmarks/bench_cuda.py reports the same agreement
at SmolLM2-135M's shape."""

import numpy as np
import pytest
import torch

from recalign.align.config import AlignConfig
from recalign.align.logprobs import PolicyScorer, collate
from recalign.align.loop import build_policy, encode_pairs
from recalign.align.losses import listwise_loss
from recalign.pairs.read import load_pairs
from tests.helpers.align import SMALL_ALIGN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batch(pairs_uris, tiny_llama_dir, cfg):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rerank = [u for u in pairs_uris if u.endswith("rerank.parquet")]
    examples = encode_pairs(tokenizer, load_pairs(rerank, cfg.negatives_loaded), cfg)
    return tokenizer, collate(examples[:4], tokenizer.pad_token_id)


def test_packed_logps_and_listwise_loss_agree_on_cuda_bf16(pairs_uris, tiny_llama_dir):
    results = {}
    for device, dtype in [("cpu", "float32"), ("cuda", "bfloat16")]:
        cfg = AlignConfig(num_train_epochs=0, sft_max_steps=1, dtype=dtype, **SMALL_ALIGN)
        _, batch = _batch(pairs_uris, tiny_llama_dir, cfg)
        model = build_policy(str(tiny_llama_dir), cfg, torch.device(device))
        batch = batch.to(device)
        logps = PolicyScorer(model)(**batch.tensors())
        losses, _ = listwise_loss(logps, batch.present())
        losses.mean().backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
        assert grads and all(g is not None and torch.isfinite(g.float()).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads), "the listwise loss reaches the LoRA weights"
        results[device] = (logps.detach().float().cpu(), losses.detach().float().cpu())
    # bfloat16 keeps 8 bits of mantissa: log-probs near -10 agree to about 0.1
    assert torch.allclose(results["cuda"][0], results["cpu"][0], atol=0.25, rtol=0.02)
    assert torch.allclose(results["cuda"][1], results["cpu"][1], atol=0.1)


def test_letter_scoring_on_cuda_matches_the_cpu(tiny_llama_dir):
    import functools

    from recalign.llm.policy import load_policy
    from recalign.rerank.scorer import LetterScorer, RerankConfig

    prompts_ = np.array(["<|im_start|>user\nPick one: A. x B. y C. z<|im_end|>\n<|im_start|>assistant\n"] * 2,
                        dtype=object)
    cpu = LetterScorer(functools.partial(load_policy, str(tiny_llama_dir)), 3, RerankConfig(max_new_tokens=0))
    cpu.model.to("cpu")
    cpu.device = torch.device("cpu")
    on_cpu = cpu({"row": np.arange(2), "prompt": prompts_}, generate=False)["letter_logits"]
    gpu = LetterScorer(functools.partial(load_policy, str(tiny_llama_dir), None, "bfloat16"), 3,
                       RerankConfig(max_new_tokens=0, dtype="bfloat16"))
    assert gpu.device.type == "cuda"
    on_gpu = gpu({"row": np.arange(2), "prompt": prompts_}, generate=False)["letter_logits"]
    assert np.allclose(on_gpu, on_cpu, atol=0.1)


def test_projector_forward_and_backward_on_cuda_bf16_match_the_cpu(tiny_llama_dir):
    """An ID-only prompt through CollabLM: the soft tokens, the packed log-probs of the letters and the listwise
    loss's gradients into the projector and the LoRA weights, bf16 on CUDA against float32 on the CPU."""
    from recalign.align.logprobs import encode_example, packed_logps
    from recalign.llm.collab import CollabLM
    from recalign.prompts import item_marker
    from transformers import AutoTokenizer

    from tests.helpers.collab import lora_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    table = torch.randn(41, 8, generator=torch.Generator().manual_seed(3)) * 0.3
    prompts = [f"<|im_start|>user\n1. {item_marker(2)}\nA. {item_marker(5)}\nB. {item_marker(9)}\n"
               f"C. {item_marker(30)}<|im_end|>\n<|im_start|>assistant\n",
               f"<|im_start|>user\nA. {item_marker(12)}\nB. {item_marker(4)}\nC. {item_marker(7)}<|im_end|>\n"
               "<|im_start|>assistant\n"]
    batch = collate([encode_example(tokenizer, p, ["A", "B", "C"], 256, 4, add_eos=False) for p in prompts],
                    tokenizer.pad_token_id)
    results = {}
    for device, dtype in [("cpu", torch.float32), ("cuda", torch.bfloat16)]:
        model = CollabLM.fresh(lora_model(tiny_llama_dir, seed=1), table, seed=0).to(device=device, dtype=dtype)
        soft = model.projector(model.item_table[[5, 9, 30]].to(dtype))
        logps = packed_logps(model, **batch.to(device).tensors())
        losses, _ = listwise_loss(logps, batch.present().to(device))
        losses.mean().backward()
        projector = torch.cat([p.grad.float().flatten().cpu() for p in model.projector.parameters()])
        lora = torch.cat([p.grad.float().flatten().cpu() for n, p in model.named_parameters() if "lora_" in n])
        assert projector.abs().sum() > 0 and lora.abs().sum() > 0, f"{device}: gradients reach both"
        results[device] = [t.detach().float().cpu() for t in (soft, logps, losses)] + [projector, lora]
    cpu, cuda = results["cpu"], results["cuda"]
    assert torch.allclose(cuda[0], cpu[0], atol=0.02, rtol=0.02), "soft tokens"
    assert torch.allclose(cuda[1], cpu[1], atol=0.25, rtol=0.02), "letter log-probs"
    assert torch.allclose(cuda[2], cpu[2], atol=0.1), "listwise losses"
    for name, g_cuda, g_cpu in [("projector", cuda[3], cpu[3]), ("lora", cuda[4], cpu[4])]:
        cosine = torch.nn.functional.cosine_similarity(g_cuda, g_cpu, dim=0)
        assert cosine > 0.98, f"{name} gradient direction in bf16: cosine {cosine:.4f}"
