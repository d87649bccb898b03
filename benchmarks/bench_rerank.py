"""The letter re-ranker's two engines on SmolLM2: prompts scored per second by transformers and by vLLM
(`rerank.engine`), for the text prompt and the ID-only prompt (collaborative tokens, fed to vLLM as prompt
embeddings), with the largest letter-logit difference between the engines, all measured in one run.

    python jobs/prepare.py run.name=bench && python benchmarks/bench_rerank.py    # 32 test users each
    python benchmarks/bench_rerank.py --users 16 --dtype float32 --out runs/bench/rerank_f32.json

The ID-only policy is the base model with a fresh projector over a random item table the size of SASRec's
(speed does not depend on what the projector learned). Each engine scores a warm-up chunk first (vLLM's first
request compiles its kernels), then the users in chunks of --batch-size, decoding --max-new-tokens greedy
tokens per prompt as the evaluation does. The engines run one after the other, never together.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import tempfile
import time

from common import run_parser  # noqa: E402  (puts the repository on sys.path first)


def parse_args(argv=None) -> argparse.Namespace:
    parser = run_parser(__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--users", type=int, default=32, help="test users scored per engine and prompt")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 (the demo's)")
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--out", default="runs/bench/bench_rerank.json")
    return parser.parse_args(argv)


def collab_policy(model_path: str, num_items: int, item_dim: int, out_dir: str) -> str:
    """The base model with a zero-initialised LoRA and a fresh projector over a random item table, saved."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from recalign.llm.collab import CollabLM

    base = AutoModelForCausalLM.from_pretrained(model_path)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    table = torch.randn(num_items + 1, item_dim, generator=torch.Generator().manual_seed(0))
    CollabLM.fresh(peft, table).save_pretrained(out_dir)
    return out_dir


def timed(scorer, texts: list[str], batch_size: int) -> tuple[float, "object"]:
    import numpy as np

    scorer({"row": np.arange(2), "prompt": np.array(texts[:2], dtype=object)})  # warm-up
    start = time.perf_counter()
    out = scorer({"row": np.arange(len(texts)), "prompt": np.array(texts, dtype=object)})
    return time.perf_counter() - start, out["letter_logits"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np

    from recalign.data.dataset import Dataset
    from recalign.llm.collab import encode_prompt
    from recalign.llm.convert import resolve_model
    from recalign.llm.policy import load_policy
    from recalign.rerank.scorer import RerankConfig, build_prompts, scorer_class
    from serve.app import run_prompt, run_spec

    model_path = str(resolve_model(args.model, run_spec(args.run_dir).models("models")))
    data = Dataset(os.path.join(args.run_dir, "data"))
    rows = np.arange(args.users)
    text_prompt = run_prompt(args.run_dir)
    prompts = {"text": text_prompt, "ids": dataclasses.replace(text_prompt, item_tokens="ids")}
    result: dict = {"model": model_path, "users": args.users, "batch_size": args.batch_size, "dtype": args.dtype,
                    "threads": args.threads, "max_new_tokens": args.max_new_tokens, "cpus": os.cpu_count(),
                    "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = collab_policy(model_path, data.num_items, 64, tmp)
        for kind, prompt in prompts.items():
            loader = functools.partial(load_policy, model_path, adapter if kind == "ids" else None, args.dtype)
            tokenizer = loader()[1]
            texts = build_prompts(data, "test", rows, tokenizer, prompt)
            tokens = [len(encode_prompt(tokenizer, t)) for t in texts]  # a collaborative token is one
            logits = {}
            for engine in args.engines.split(","):
                cfg = RerankConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                                   threads=args.threads, engine=engine)
                start = time.perf_counter()
                scorer = scorer_class(cfg)(loader, 20, cfg)
                startup = time.perf_counter() - start
                seconds, logits[engine] = timed(scorer, texts, args.batch_size)
                del scorer
                result["runs"][f"{kind}/{engine}"] = {
                    "startup_s": round(startup, 1), "seconds": round(seconds, 2),
                    "prompts_per_s": round(len(texts) / seconds, 3), "mean_prompt_tokens": round(float(np.mean(tokens)))}
                print(f"{kind:>4} {engine:>12}: {len(texts) / seconds:6.2f} prompts/s "
                      f"(start {startup:.0f} s, {np.mean(tokens):.0f} tokens)", flush=True)
            if len(logits) == 2:
                a, b = logits.values()
                result["runs"][f"{kind}/agreement"] = {
                    "max_abs_logit_diff": float(np.abs(a - b).max()),
                    "same_top1": float((a.argmax(1) == b.argmax(1)).mean())}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp_out, args.out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
