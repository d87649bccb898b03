"""Experiment: the letter re-ranker's listwise SFT with a GPU's worth of examples, on one GPU and outside Ray,
for the text prompt and the ID-only prompt (collaborative tokens), scored on every test user.

    python jobs/prepare.py run.name=bench && python benchmarks/listwise_gpu.py --train-seconds 150

What the pipeline's re-rank SFT policy does (the sliding-window set of pairs.windows, LlamaRec; the listwise
loss over the 20 letters' logits; LoRA; for ID-only, a projector over SASRec's item embeddings trained with
it), with the same library functions, in one process: SASRec is trained first on the GPU (its item table feeds
the projector, and its test metrics are the reference), then each prompt kind trains for --train-seconds
and is scored on all test users by the letter scorer. It answers one question the 2-core demo cannot: does
the re-ranker learn when it sees tens of thousands of examples instead of eighty? It is not the quality
preset: no Ray, no checkpoints, no validation-chosen stopping.
"""

from __future__ import annotations

import argparse
import os
import time

from common import run_parser  # noqa: E402  (puts the repository on sys.path first)


def parse_args(argv=None) -> argparse.Namespace:
    parser = run_parser(__doc__)
    parser.add_argument("--model", default="models/smollm2-135m-instruct", help="a Hugging Face folder")
    parser.add_argument("--kinds", default="ids,text", help="prompt kinds in order: ids, hybrid, text")
    parser.add_argument("--train-seconds", type=float, default=150.0, help="training time per prompt kind")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--sasrec-epochs", type=int, default=40)
    parser.add_argument("--max-windows", type=int, default=20000, help="a seeded subset of the sliding windows")
    parser.add_argument("--test-users", type=int, default=0, help="0 = every test user")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="runs/bench/listwise_gpu.json")
    return parser.parse_args(argv)


def train_sasrec(data, epochs: int, device):
    """SASRec (the pipeline's default shape) on the train sequences, full-softmax next-item loss."""
    import torch

    from recalign.recsys.sasrec import SASRec, SASRecConfig, next_item_loss
    from recalign.recsys.train import make_windows

    torch.manual_seed(0)
    cfg = SASRecConfig()
    model = SASRec(data.num_items, cfg).to(device)
    inputs, targets = make_windows(data.train_sequences(), cfg.max_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for rows in torch.randperm(len(inputs), generator=generator).split(128):
            loss = next_item_loss(model(inputs[rows].to(device)), model.item_emb.weight, targets[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def ranked(scores, target_index) -> dict[str, float]:
    import numpy as np
    import torch

    from recalign import metrics

    values = metrics.compute(torch.as_tensor(np.asarray(scores, dtype=np.float32)), torch.as_tensor(target_index),
                             ("ndcg@10", "hr@1", "mrr"))
    return {k: round(float(np.mean(np.asarray(v))), 4) for k, v in values.items()}


def letter_metrics(model, tokenizer, texts: list[str], target_index) -> tuple[dict, float]:
    """The letter scorer over the prompts (no free generation), and its prompts/s."""
    import numpy as np

    from recalign.rerank.scorer import LetterScorer, RerankConfig

    model.eval()
    scorer = LetterScorer(lambda: (model, tokenizer), 20, RerankConfig(max_new_tokens=0, batch_size=32))
    start = time.perf_counter()
    out = scorer({"row": np.arange(len(texts)), "prompt": np.array(texts, dtype=object)}, generate=False)
    return ranked(out["letter_logits"], target_index), len(texts) / (time.perf_counter() - start)


def run_kind(kind: str, args, data, table, rows, device) -> dict:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from recalign.align.config import AlignConfig
    from recalign.align.logprobs import PolicyScorer, encode_example
    from recalign.align.loop import build_policy, train_step
    from recalign.align.records import SFT
    from recalign.llm.collab import CollabLM
    from recalign.pairs.build import PairsConfig, WindowsConfig, window_pairs
    from recalign.prompts import PromptConfig
    from recalign.rerank.scorer import build_prompts

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt = PromptConfig(max_history=10, show_genres=False, item_tokens="none" if kind == "text" else kind)
    windows, _ = window_pairs(data, tokenizer, PairsConfig(prompt=prompt, windows=WindowsConfig(per_user=-1,
                                                                                       max_examples=args.max_windows)))
    windows = windows.to_pylist()
    # float32 weights and AdamW state, bf16 matmuls under autocast (a bf16 LoRA weight loses small updates)
    cfg = AlignConfig(lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, dtype="float32",
                      bf16=device.type == "cuda",
                      sft_loss="listwise", max_prompt_length=1536, max_completion_length=4,
                      per_device_train_batch_size=args.batch_size)
    examples = [encode_example(tokenizer, w["prompt"], [w["chosen"], *w["rejected"]], cfg.max_prompt_length,
                               cfg.max_completion_length, add_eos=False) for w in windows]
    model = build_policy(args.model, cfg, device)
    if kind != "text":
        model = CollabLM.fresh(model, table, seed=cfg.seed)
    test = data.split("test")
    texts = build_prompts(data, "test", rows, tokenizer, prompt)
    before, _ = letter_metrics(model, tokenizer, texts, test.target_index[rows])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scorer = PolicyScorer(model, cfg.prompt_sharing)
    rng = np.random.default_rng(0)
    order, losses, top1, steps = rng.permutation(len(examples)), [], [], 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.train_seconds:
        batch = order[(steps * args.batch_size) % len(order):][:args.batch_size]
        sums = train_step(scorer, model, optimizer, examples, [batch], cfg, pad_id, device, SFT, None, trainable)
        losses.append(sums["loss_sum"] / sums["examples"])
        top1.append(sums["top1_sum"] / sums["examples"])
        steps += 1
    seconds = time.perf_counter() - start
    after, per_s = letter_metrics(model, tokenizer, texts, test.target_index[rows])
    tail = max(1, steps // 10)
    result = {"windows": len(examples), "steps": steps, "examples_seen": steps * args.batch_size,
              "epochs": round(steps * args.batch_size / len(examples), 3), "train_seconds": round(seconds, 1),
              "loss_first_10pct": round(float(np.mean(losses[:tail])), 4),
              "loss_last_10pct": round(float(np.mean(losses[-tail:])), 4),
              "train_top1_last_10pct": round(float(np.mean(top1[-tail:])), 4),
              "test_before": before, "test_after": after, "score_prompts_per_s": round(per_s, 1)}
    print(kind, result, flush=True)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch

    from recalign import io
    from recalign.data.dataset import Dataset
    from recalign.recsys.train import score_split

    device = torch.device(args.device)
    data = Dataset(os.path.join(args.run_dir, "data"))
    test = data.split("test")
    rows = np.arange(len(test) if args.test_users <= 0 else min(args.test_users, len(test)))
    start = time.perf_counter()
    sasrec = train_sasrec(data, args.sasrec_epochs, device)
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "args": vars(args),
                    "test_users": len(rows), "chance_hr@1": 0.05,
                    "sasrec": {"epochs": args.sasrec_epochs, "seconds": round(time.perf_counter() - start, 1),
                               **ranked(score_split(sasrec, test.history[rows], test.candidates[rows]),
                                        test.target_index[rows])}}
    print("sasrec", report["sasrec"], flush=True)
    table = sasrec.item_emb.weight.detach().float().cpu()
    for kind in args.kinds.split(","):
        report[kind] = run_kind(kind, args, data, table, rows, device)
        io.write_json(report, args.out)  # what is done so far survives a timeout
    return report


if __name__ == "__main__":
    main()
