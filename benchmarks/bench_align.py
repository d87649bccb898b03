"""Preference-training step time on SmolLM2: the prompt encoded once vs K + 1 full sequences, and TRL.

    python benchmarks/bench_align.py                                  # K in 1,3,7; packed, kv_cache, none; TRL at K=1
    python benchmarks/bench_align.py --path rerank --ks 1,7 --repeats 3 --out runs/bench/align.json

One training step = what `recalign.align.loop.train_step` does on a worker: policy log-probs of the
1 + K completions (with grad), reference log-probs (adapter disabled, no grad), the S-DPO loss,
backward, clipping and an AdamW step on the LoRA weights. The same examples (ml-100k prompts of the
`--path` kind, heuristic pairs) feed every mode:
  packed    one sequence per example, block attention mask (the trainer's default)
  kv_cache  prompt once with the KV cache on, cache repeated over the completions
  none      K + 1 full prompt + completion sequences (the naive form, as TRL does at K = 1)
Modes run back to back within each round, in rotating order, so a slow spell on a shared machine
hits them alike. tokens = prompt + completion tokens of the 1 + K sequences (the naive form's work),
so tokens/s compares modes on the same tokens. Each step's process CPU time is recorded too: other
jobs on the machine disturb it far less than wall time.

At K = 1, TRL's DPOTrainer.training_step (its own collator, LoRA from the same peft config, reference
= adapter disabled) plus an AdamW step runs on the same examples.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "platform"))

MODES = ("packed", "kv_cache", "none")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    parser.add_argument("--path", default="knowledge", choices=["knowledge", "rerank"], help="kind of prompt")
    parser.add_argument("--ks", default="1,3,7", help="numbers of negatives K")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batch-size", type=int, default=1, help="examples per step")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-history", type=int, default=20, help="history items in a prompt (PromptConfig)")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="0 keeps every mode computing the same function (and saves the dropout copies)")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL's DPOTrainer at K=1")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "recalign-bench-data"))
    parser.add_argument("--out", default="", help="JSON results file")
    return parser.parse_args(argv)


def build_examples(args, tokenizer, cfg):
    from recalign.align.loop import encode_pairs
    from recalign.data.dataset import DataConfig, prepare
    from recalign.pairs.heuristic import heuristic_pairs
    from recalign.pairs.read import PreferenceExample
    from recalign.prompts import PromptConfig

    prepare(DataConfig(), args.data_dir)
    table = heuristic_pairs(args.data_dir, tokenizer, args.path, max(args.ks), num_users=args.batch_size, seed=0,
                            prompt_cfg=PromptConfig(max_history=args.max_history))
    pairs = [PreferenceExample(r["user_idx"], r["path"], r["prompt"], r["chosen"], r["rejected"])
             for r in table.to_pylist()]
    return encode_pairs(tokenizer, pairs, cfg)


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def our_step(model, optimizer, trainable, examples, k: int, mode: str, pad_id: int):
    """One train_step of the S-DPO trainer on the examples' first k negatives."""
    import dataclasses

    import numpy as np
    import torch

    from recalign.align.config import AlignConfig
    from recalign.align.logprobs import PolicyScorer
    from recalign.align.loop import train_step

    cfg = AlignConfig(loss_type="sdpo", num_negatives=k, prompt_sharing=mode)
    trimmed = [dataclasses.replace(e, completion_ids=e.completion_ids[:k + 1]) for e in examples]
    rows = [np.arange(len(trimmed))]
    return train_step(PolicyScorer(model, mode), model, optimizer, trimmed, rows, cfg, pad_id, torch.device("cpu"),
                      "preference", None, trainable)


def check_modes_agree(model, examples, modes, pad_id) -> float:
    import torch

    from recalign.align.logprobs import SCORERS, collate

    batch = collate(examples, pad_id)
    model.eval()
    with torch.no_grad():
        values = [SCORERS[m](model, **batch.tensors()) for m in modes]
    model.train()
    return max(float((v - values[-1]).abs().max()) for v in values)


def trl_runner(args, examples, tokenizer):
    """A K=1 training step of TRL's DPOTrainer (sigmoid loss) on the same examples."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from recalign.align.config import AlignConfig

    cfg = AlignConfig(lora_dropout=args.lora_dropout)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    features = [{"prompt_ids": e.prompt_ids, "chosen_ids": e.completion_ids[0], "rejected_ids": e.completion_ids[1]}
                for e in examples]
    dummy = Dataset.from_list([{"prompt": "x", "chosen": "y", "rejected": "z"}])
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(args.model), processing_class=tokenizer,
                         peft_config=lora, train_dataset=dummy,
                         args=DPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], beta=cfg.beta,
                                        max_length=None, per_device_train_batch_size=len(examples),
                                        loss_type=["sigmoid"], gradient_checkpointing=False))
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, which we do not run
    batch = trainer.data_collator(features)
    tokens = int(batch["attention_mask"].sum())
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]

    def step():
        loss = trainer.training_step(trainer.model, batch)
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return {"loss_sum": float(loss) * len(examples), "sequence_tokens": tokens}

    return step


def main(argv=None) -> dict:
    import torch
    from transformers import AutoTokenizer

    from recalign.align.config import AlignConfig
    from recalign.align.loop import build_policy

    args = parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = AlignConfig(num_negatives=max(args.ks), lora_dropout=args.lora_dropout)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    examples = build_examples(args, tokenizer, cfg)
    model = build_policy(args.model, cfg, torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_tokens = [len(e.prompt_ids) for e in examples]
    completion_tokens = [len(c) for e in examples for c in e.completion_ids]
    print(f"{args.path} prompts: {len(examples)} per step, prompt tokens {prompt_tokens}, completion tokens mean "
          f"{statistics.mean(completion_tokens):.1f}; threads {args.threads}", flush=True)
    print(f"max |log-prob difference| between modes: {check_modes_agree(model, examples, modes, pad_id):.2e}",
          flush=True)

    runners = {(k, mode): (lambda k=k, mode=mode: our_step(model, optimizer, trainable, examples, k, mode, pad_id))
               for k in args.ks for mode in modes}
    if not args.no_trl and 1 in args.ks:
        runners[(1, "trl")] = trl_runner(args, examples, tokenizer)
    for key, run in runners.items():  # warm-up: allocator, thread pools, lazy inits
        if key[0] == min(args.ks):
            run()
    samples: dict = {key: [] for key in runners}
    keys = list(runners)
    for round_idx in range(args.repeats):
        shift = round_idx % len(keys)
        for key in keys[shift:] + keys[:shift]:
            wall, cpu, sums = timed(runners[key])
            max_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak so far
            samples[key].append({"wall_s": wall, "cpu_s": cpu, "tokens": int(sums["sequence_tokens"]),
                                 "max_rss_gb": max_rss_gb})
            print(f"round {round_idx} K={key[0]} {key[1]:<8} wall {wall:7.2f}s cpu {cpu:7.2f}s "
                  f"tokens {int(sums['sequence_tokens'])} peak RSS so far {max_rss_gb:.1f} GB", flush=True)
    results = summarise(samples)
    print_table(results, args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as out:
            json.dump({"args": vars(args), "prompt_tokens": prompt_tokens, "results": results}, out, indent=2)
    return results


def summarise(samples: dict) -> list[dict]:
    rows = []
    for (k, mode), runs in samples.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        cpu = statistics.median(r["cpu_s"] for r in runs)
        tokens = runs[0]["tokens"]
        rows.append({"K": k, "mode": mode, "tokens": tokens, "wall_s": wall, "cpu_s": cpu,
                     "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu})
    for row in rows:
        naive = next((r for r in rows if r["K"] == row["K"] and r["mode"] == "none"), None)
        row["speedup_wall"] = naive["wall_s"] / row["wall_s"] if naive else None
        row["speedup_cpu"] = naive["cpu_s"] / row["cpu_s"] if naive else None
    return rows


def print_table(rows: list[dict], args) -> None:
    model = os.path.basename(os.path.normpath(args.model))
    print(f"\n{model}, {args.path} prompts, batch {args.batch_size}, {args.threads} threads, median of {args.repeats} "
          "(tokens = prompt + completion tokens of the 1 + K sequences)\n")
    print("| K | mode | tokens/step | step s | step CPU s | tokens/s | tokens/CPU-s | speed-up vs none (wall / CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['speedup_wall']:.2f}x / {r['speedup_cpu']:.2f}x" if r["speedup_wall"] else "-"
        print(f"| {r['K']} | {r['mode']} | {r['tokens']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | {speed} |")


if __name__ == "__main__":
    main()
