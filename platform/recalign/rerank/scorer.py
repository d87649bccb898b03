"""The direct LLM re-ranker: score each candidate by its letter's logit at the answer position.

The prompt lists the history and the candidates tagged A, B, ... (recalign.prompts). One forward
pass gives the next-token logits after the assistant header; candidate i's score is the logit of
its letter (LlamaRec), so every row gets a complete ranking and every answer is valid. The same
call also decodes a short greedy answer (free-generation mode), parsed for ValidRatio and
HR@1 over all rows and over valid rows (PAPERS.md: report all three).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import numpy as np

from recalign import prompts
from recalign.config import option, to_dict
from recalign.data.dataset import Dataset

ENGINES = ("transformers", "vllm")


@dataclass
class RerankConfig:
    """How the letter-logit re-ranker scores. Its prompt is the run's re-rank prompt, the one the re-rank
    policies were trained on (`recalign.pairs.stage.rerank_prompt`), so it is not set here."""

    RENAMED: ClassVar[dict[str, str]] = {
        key: f"the re-rank prompt is the pairs stage's: set pairs.prompt.{key} (evaluation, the sweep and Serve "
             "read it from the run)" for key in ("max_history", "show_genres", "show_ratings")}

    max_new_tokens: int = option(8, "free-generation answer length (\"C. Title...\")")
    batch_size: int = option(4, "prompts per forward pass")
    dtype: str = option("float32", "float32 | bfloat16")
    threads: int = option(0, "torch threads per scorer actor; 0 = torch's default")
    num_actors: int = option(1, "Ray Data scorer actors")
    cpus_per_actor: float = option(1.0, "Ray CPUs per scorer actor")
    num_gpus: float = option(0.0, "Ray GPUs per scorer actor; an actor that holds one scores on it")
    engine: Literal["transformers", "vllm"] = option(
        "transformers", "transformers: one torch forward pass per chunk, the letter logits in float32 from the "
                        "answer position's hidden state; vllm: a vLLM engine per scorer actor on the merged policy, "
                        "collaborative tokens fed as prompt embeddings (enable_prompt_embeds), the letters' logits "
                        "read from its processed logits; both give the same logits (tests/rerank/test_vllm_scorer.py)")
    vllm_kv_cache_gb: float = option(0.5, "engine=vllm on CPU: KV cache in GiB")
    vllm_gpu_memory_utilization: float = option(0.5, "engine=vllm on GPU: share of GPU memory for weights + KV cache")
    vllm_max_model_len: int = option(2048, "engine=vllm: prompt + answer tokens per sequence")

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")

    def key(self) -> dict[str, Any]:
        """What fingerprints of scores made with this config hash: the vLLM engine's memory knobs never (they do
        not change a score), `engine` only when it is vllm (so the keys of runs scored with transformers stay
        the ones they had before the vllm engine existed)."""
        values = to_dict(self)
        for name in ("vllm_kv_cache_gb", "vllm_gpu_memory_utilization", "vllm_max_model_len"):
            values.pop(name)
        if self.engine == "transformers":
            values.pop("engine")
        return values


def letter_token_ids(tokenizer, num_candidates: int) -> list[int]:
    """Token id of each candidate letter as the first answer token; each must be one token."""
    ids = []
    for letter in prompts.LETTERS[:num_candidates]:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"tokenizer splits the letter {letter!r} into {len(encoded)} tokens; "
                             "letter scoring needs single-token letters")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise ValueError("tokenizer maps two candidate letters to the same token")
    return ids


def build_prompts(data: Dataset, split: str, rows: np.ndarray, tokenizer, prompt: prompts.PromptConfig) -> list[str]:
    """Chat-rendered re-rank prompts for the given rows of a split."""
    arrays = data.split(split)
    return [prompts.render(tokenizer, prompts.rerank_messages(
        data.items, arrays.history[r], arrays.history_ratings[r], arrays.candidates[r], prompt)) for r in rows]


class LetterScorer:
    """Ray Data stage: {"row", "prompt"} batch -> adds "letter_logits" (C,) and "answer".

    `loader` returns (model, tokenizer); it is injected so tests pass a tiny model.
    """

    def __init__(self, loader: Callable[[], tuple[Any, Any]], num_candidates: int, cfg: RerankConfig):
        import torch

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model, self.tokenizer = loader()
        # Ray hides the GPUs of a node from an actor that asked for none, so this is the actor's share.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.letter_ids = letter_token_ids(self.tokenizer, num_candidates)
        self.cfg = cfg
        from recalign.llm.collab import CollabLM

        self.has_projector = isinstance(self.model, CollabLM)
        # One pass at a time: the answer position is captured by a hook on the shared LM head, so two passes in
        # two threads (a Serve batch and a health check) would each read the other's hidden states.
        self.lock = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray], generate: bool = True) -> dict[str, np.ndarray]:
        """generate=False (or max_new_tokens=0): one forward pass per chunk, no answer decoded ("" each)."""
        logits, answers = [], []
        texts = list(batch["prompt"])
        for start in range(0, len(texts), self.cfg.batch_size):
            chunk_logits, chunk_answers = self._score(texts[start:start + self.cfg.batch_size],
                                                      generate and self.cfg.max_new_tokens > 0)
            logits.append(chunk_logits)
            answers.extend(chunk_answers)
        return {**batch, "letter_logits": np.concatenate(logits).astype(np.float32),
                "answer": np.array(answers, dtype=object)}

    def _score(self, texts: list[str], generate: bool = True) -> tuple[np.ndarray, list[str]]:
        with self.lock:
            return self._score_locked(texts, generate)

    def _score_locked(self, texts: list[str], generate: bool) -> tuple[np.ndarray, list[str]]:
        import torch

        from recalign.llm.collab import encode_prompts

        enc = encode_prompts(self.tokenizer, texts, self.device)
        if bool((enc["input_ids"] < 0).any()) and not self.has_projector:
            raise ValueError(NO_PROJECTOR)
        head = self.model.get_output_embeddings()
        captured: list[torch.Tensor] = []
        # The answer position's final hidden state, as the prefill feeds it to the LM head. The letter
        # logits are computed from it in float32: a bfloat16 head rounds logits near 30 to steps of
        # 0.125, which ties candidates, and ties count against the target.
        hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0][:, -1]) if not captured else None)
        try:
            with torch.no_grad():
                if generate:
                    out = self.model.generate(**enc, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                              return_dict_in_generate=True, pad_token_id=self.tokenizer.pad_token_id)
                else:
                    self.model(**enc)
        finally:
            hook.remove()
        with torch.no_grad():
            letter_logits = captured[0].float() @ head.weight[self.letter_ids].float().T
            if getattr(head, "bias", None) is not None:
                letter_logits = letter_logits + head.bias[self.letter_ids].float()
        letter_logits = letter_logits.cpu().numpy()
        if not generate:
            return letter_logits, [""] * len(texts)
        new_tokens = out.sequences[:, enc["input_ids"].shape[1]:].cpu()
        answers = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return letter_logits, answers


class VLLMLetterScorer(LetterScorer):
    """LetterScorer on a vLLM engine (`RerankConfig.engine=vllm`): the same batches in, the same columns out.

    vLLM loads weights from a folder, so the loader's merged policy is written to a node-local temporary one
    for the actor's life. A prompt with collaborative tokens goes in as prompt embeddings (the CollabLM's
    token embeddings with the projected items in place; vLLM's `enable_prompt_embeds`), one without as token
    ids. Each prompt is one request for a single token restricted to the letters, whose processed logits are
    the letters' raw logits, and one greedy request for the free-generation answer."""

    def __init__(self, loader: Callable[[], tuple[Any, Any]], num_candidates: int, cfg: RerankConfig):
        import tempfile

        import torch
        from vllm import SamplingParams

        from recalign.llm.collab import CollabLM
        from recalign.sampling.engines import EngineConfig, VLLMEngine

        model, self.tokenizer = loader()
        self.letter_ids = letter_token_ids(self.tokenizer, num_candidates)
        self.cfg = cfg
        self.collab = model if isinstance(model, CollabLM) else None
        self.has_projector = self.collab is not None
        self.dtype = getattr(torch, cfg.dtype)
        self.weights = tempfile.TemporaryDirectory(prefix="recalign-scorer-")
        (self.collab.model if self.collab is not None else model).save_pretrained(self.weights.name)
        self.tokenizer.save_pretrained(self.weights.name)
        del model
        engine = EngineConfig(engine="vllm", dtype=cfg.dtype, threads=cfg.threads, enforce_eager=True,
                              max_model_len=cfg.vllm_max_model_len, kv_cache_gb=cfg.vllm_kv_cache_gb,
                              gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
        self.engine = VLLMEngine(self.weights.name, seed=0, cfg=engine, llm_kwargs={
            "enable_prompt_embeds": True, "logprobs_mode": "processed_logits", "max_logprobs": len(self.letter_ids)})
        self.score_params = SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=self.letter_ids,
                                           logprobs=len(self.letter_ids))
        self.answer_params = SamplingParams(max_tokens=max(cfg.max_new_tokens, 1), temperature=0.0)
        self.lock = threading.Lock()

    def _request(self, text: str) -> dict[str, Any]:
        import torch

        from recalign.llm.collab import encode_prompt

        ids = encode_prompt(self.tokenizer, text)
        if min(ids) >= 0:
            return {"prompt_token_ids": ids}
        if self.collab is None:
            raise ValueError(NO_PROJECTOR)
        with torch.no_grad():
            return {"prompt_embeds": self.collab.embed(torch.tensor([ids]))[0].to(self.dtype).cpu()}

    def _score_locked(self, texts: list[str], generate: bool) -> tuple[np.ndarray, list[str]]:
        requests = [self._request(t) for t in texts]
        params = [self.score_params] * len(texts) + ([self.answer_params] * len(texts) if generate else [])
        outputs = self.engine.llm.generate(requests + (requests if generate else []), params, use_tqdm=False)
        logits = np.empty((len(texts), len(self.letter_ids)), dtype=np.float32)
        for row, out in enumerate(outputs[:len(texts)]):
            top = out.outputs[0].logprobs[0]
            missing = [t for t in self.letter_ids if t not in top]
            if missing:
                raise RuntimeError(f"vLLM returned logits for {len(top)} of the {len(self.letter_ids)} letters")
            logits[row] = [top[t].logprob for t in self.letter_ids]
        answers = [out.outputs[0].text for out in outputs[len(texts):]] if generate else [""] * len(texts)
        return logits, answers


NO_PROJECTOR = ("the prompts hold collaborative item tokens (<item:N>) but this policy has no projector "
                "(collab.safetensors beside its adapter): prompt it with item_tokens=none")


def scorer_class(cfg: RerankConfig) -> type[LetterScorer]:
    """The letter scorer `cfg.engine` names."""
    return VLLMLetterScorer if cfg.engine == "vllm" else LetterScorer


def free_generation_metrics(answers: list[str], target_index: np.ndarray, num_candidates: int) -> dict[str, float]:
    """ValidRatio and HR@1 over all rows and over valid rows (LLaRA divides by valid rows only)."""
    parsed = [prompts.parse_letter(a, num_candidates) for a in answers]
    valid = np.array([p is not None for p in parsed])
    hit = np.array([p is not None and p == t for p, t in zip(parsed, target_index)])
    # HR@1 over valid rows is undefined when no answer is valid: NaN (shown as "-"), not 0.
    return {"valid_ratio": float(valid.mean()) if len(valid) else 0.0,
            "hr@1_all_rows": float(hit.mean()) if len(hit) else 0.0,
            "hr@1_valid_rows": float(hit[valid].mean()) if valid.any() else float("nan")}


def score_rows_with_ray(prompts_by_row: dict[int, str], loader: Callable[[], tuple[Any, Any]],
                        num_candidates: int, cfg: RerankConfig) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Run LetterScorer over the prompts on Ray Data actors; returns logits and answers by row."""
    import ray.data
    from ray.data import ActorPoolStrategy

    rows = sorted(prompts_by_row)
    ds = ray.data.from_items([{"row": r, "prompt": prompts_by_row[r]} for r in rows])
    scored = ds.map_batches(
        scorer_class(cfg), fn_constructor_kwargs={"loader": loader, "num_candidates": num_candidates, "cfg": cfg},
        batch_size=max(cfg.batch_size, 1) * 4, compute=ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.num_gpus, batch_format="numpy")
    logits, answers = {}, {}
    for record in scored.iter_rows():
        logits[int(record["row"])] = np.asarray(record["letter_logits"], dtype=np.float32)
        answers[int(record["row"])] = str(record["answer"])
    missing = set(rows) - set(logits)
    if missing:
        raise RuntimeError(f"LLM re-ranker returned no scores for {len(missing)} rows")
    return logits, answers
