"""The torch-only parts on CUDA in bfloat16 against float32 on the CPU, at SmolLM2-135M's shape: letter scoring
(text and ID-only prompts), the packed log-probs and listwise loss of a training step, and the projector of
collaborative tokens forward and backward. Reports how closely they agree and how fast each side runs.

    python jobs/prepare.py run.name=bench && python benchmarks/bench_cuda.py    # on a machine with a GPU

The model has SmolLM2-135M-Instruct's layers (576 wide, 30 layers, 9 heads, 3 KV heads) with random weights and
the tiny in-process tokenizer, so it needs no model files: agreement depends on the arithmetic, not on what the
weights learned. Prompts are ml-100k test users' re-rank prompts (20 candidates, 10 history items), the ID-only
ones through a fresh projector over a random 64-wide item table. tests/align/test_cuda.py asserts the same
agreement on the tiny model; this script measures it at full depth.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from common import run_parser  # noqa: E402  (puts the repository on sys.path first)

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = run_parser(__doc__)
    parser.add_argument("--users", type=int, default=16, help="test users scored on each side")
    parser.add_argument("--train-examples", type=int, default=4, help="examples in the training step's batch")
    parser.add_argument("--layers", type=int, default=SMOLLM2_SHAPE["num_hidden_layers"])
    parser.add_argument("--device", default="cuda", help="the bf16 side: cuda, or cpu for a dry run of the script")
    parser.add_argument("--out", default="runs/bench/bench_cuda.json")
    return parser.parse_args(argv)


def random_smollm2(out_dir: str, layers: int) -> str:
    """SmolLM2-135M's architecture, random weights (seeded), and the tiny tokenizer, saved to `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from recalign.llm.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    shape = {**SMOLLM2_SHAPE, "num_hidden_layers": layers}
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, initializer_range=0.02,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def policy(model_dir: str, dtype, table=None, lora: bool = False, seed: int = 0):
    """The model (a random non-zero LoRA when `lora`), wrapped in a fresh CollabLM when `table` is given."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from recalign.llm.collab import CollabLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj"]))
    if table is not None:
        model = CollabLM.fresh(model, table, seed=seed)
    return model.to(dtype)


def compare(cuda, cpu) -> dict:
    """Largest and mean absolute difference, and the difference relative to the CPU values' spread."""
    import torch

    cuda, cpu = cuda.float().cpu(), cpu.float().cpu()
    diff = (cuda - cpu).abs()
    return {"max_abs": round(float(diff.max()), 5), "mean_abs": round(float(diff.mean()), 5),
            "cpu_std": round(float(cpu.std()), 5), "max_abs_over_std": round(float(diff.max() / cpu.std()), 5),
            "close_atol_0.25_rtol_0.02": bool(torch.allclose(cuda, cpu, atol=0.25, rtol=0.02))}


def ranking_agreement(cuda, cpu) -> dict:
    """Same top candidate, and the mean Spearman correlation of the two rankings per row."""
    import numpy as np

    top1 = float(np.mean(cuda.argmax(axis=1) == cpu.argmax(axis=1)))
    ranks = lambda a: a.argsort(axis=1).argsort(axis=1).astype(float)  # noqa: E731
    rc, rg = ranks(cpu), ranks(cuda)
    rc -= rc.mean(axis=1, keepdims=True)
    rg -= rg.mean(axis=1, keepdims=True)
    spearman = (rc * rg).sum(axis=1) / np.sqrt((rc ** 2).sum(axis=1) * (rg ** 2).sum(axis=1))
    return {"same_top1": round(top1, 4), "mean_spearman": round(float(spearman.mean()), 5)}


def score(model, tokenizer, texts: list[str], device: str) -> tuple[float, "object"]:
    """Letter logits of every prompt through LetterScorer (one forward pass per chunk of 4), and prompts/s."""
    import numpy as np
    import torch

    from recalign.rerank.scorer import LetterScorer, RerankConfig

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    scorer = LetterScorer(lambda: (model, tokenizer), 20, RerankConfig(max_new_tokens=0, dtype=dtype))
    scorer.model.to(device)
    scorer.device = torch.device(device)
    batch = {"row": np.arange(len(texts)), "prompt": np.array(texts, dtype=object)}
    scorer({k: v[:4] for k, v in batch.items()}, generate=False)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    logits = scorer(batch, generate=False)["letter_logits"]
    if device == "cuda":
        torch.cuda.synchronize()
    return len(texts) / (time.perf_counter() - start), logits


def train_step(model, batch, device: str) -> dict:
    """Packed log-probs of the 20 letters, the listwise loss, backward; the values, gradients and step time."""
    import torch

    from recalign.align.logprobs import packed_logps
    from recalign.align.losses import listwise_loss

    batch = batch.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    logps = packed_logps(model, **batch.tensors())
    losses, _ = listwise_loss(logps, batch.present())
    losses.mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grads: dict[str, list] = {"projector": [], "lora": []}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grads["projector" if "projector" in name else "lora"].append(param.grad.float().flatten().cpu())
    return {"logps": logps.detach(), "losses": losses.detach(), "seconds": seconds,
            "grads": {part: torch.cat(values) for part, values in grads.items() if values}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from recalign import io
    from recalign.align.logprobs import collate, encode_example
    from recalign.data.dataset import Dataset
    from recalign.prompts import PromptConfig, rerank_answer
    from recalign.rerank.scorer import build_prompts

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_cuda: no CUDA GPU here (--device cpu runs the script with bf16 on the CPU)")
    data = Dataset(os.path.join(args.run_dir, "data"))
    rows = np.arange(args.users)
    table = torch.randn(data.num_items + 1, 64, generator=torch.Generator().manual_seed(0))
    table[0] = 0
    report: dict = {"bf16_device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "shape": {**SMOLLM2_SHAPE, "num_hidden_layers": args.layers},
                    "users": args.users, "candidates": 20}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_smollm2(tmp, args.layers)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.padding_side = "left"
        for kind in ("none", "ids"):
            texts = build_prompts(data, "test", rows, tokenizer,
                                  PromptConfig(max_history=10, show_genres=False, item_tokens=kind))
            side = {}
            for side_name, device, dtype in [("cpu", "cpu", torch.float32), ("cuda", args.device, torch.bfloat16)]:
                model = policy(model_dir, dtype, table if kind == "ids" else None).eval()
                side[side_name] = score(model, tokenizer, texts, device)
                del model
            report[f"letter_scoring_{kind}"] = {
                "prompt_tokens_mean": round(float(np.mean([len(tokenizer(t)["input_ids"]) for t in texts])), 1),
                "cpu_prompts_per_s": round(side["cpu"][0], 2), "cuda_prompts_per_s": round(side["cuda"][0], 2),
                "speedup": round(side["cuda"][0] / side["cpu"][0], 1),
                **compare(torch.from_numpy(side["cuda"][1]), torch.from_numpy(side["cpu"][1])),
                **ranking_agreement(side["cuda"][1], side["cpu"][1])}
            print(kind, report[f"letter_scoring_{kind}"], flush=True)

            # Each of the 20 letters a completion, A first (the listwise label is column 0); markers become -item.
            letters = [rerank_answer(p) for p in range(20)]
            examples = [encode_example(tokenizer, text, letters, 4096, 4, add_eos=False)
                        for text in texts[:args.train_examples]]
            batch = collate(examples, tokenizer.pad_token_id)
            steps = {}
            for side_name, device, dtype in [("cpu", "cpu", torch.float32), ("cuda", args.device, torch.bfloat16)]:
                model = policy(model_dir, dtype, table if kind == "ids" else None, lora=True, seed=1).to(device)
                train_step(model, batch, device)  # warm-up, then a clean step
                model.zero_grad(set_to_none=True)
                steps[side_name] = train_step(model, batch, device)
                del model
            cuda, cpu = steps["cuda"], steps["cpu"]
            entry = {"examples": len(examples), "cpu_step_s": round(cpu["seconds"], 3),
                     "cuda_step_s": round(cuda["seconds"], 4), "speedup": round(cpu["seconds"] / cuda["seconds"], 1),
                     "logps": compare(cuda["logps"], cpu["logps"]), "losses": compare(cuda["losses"], cpu["losses"])}
            for part in ("lora", "projector") if kind == "ids" else ("lora",):
                entry[f"{part}_grad_cosine"] = round(float(torch.nn.functional.cosine_similarity(
                    cuda["grads"][part], cpu["grads"][part], dim=0)), 5)
                entry[f"{part}_grad_norm_ratio"] = round(float(cuda["grads"][part].norm() /
                                                               cpu["grads"][part].norm()), 5)
            report[f"train_step_{kind}"] = entry
            print(kind, entry, flush=True)
    io.write_json(report, args.out)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
