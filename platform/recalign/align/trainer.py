"""Preference alignment (DPO, DMPO, S-DPO with K negatives) of a LoRA policy under Ray Train.

`train_policy` is the driver: it checks the inputs, runs `recalign.align.loop.train_loop` on every
worker of a TorchTrainer (DDP: gloo on CPU, NCCL on GPU; checkpoints in the run storage; restarts
from the last checkpoint after a worker dies) and publishes the final LoRA adapter (standard PEFT
format) with metrics.json and the TensorBoard events to `out_dir` atomically. It never calls
ray.init, so it runs from a job, a pipeline stage or inside a Ray Tune trial.

The reference policy is the base model with the adapter disabled (no second copy of the weights).
After an SFT warm-up it is the warmed-up policy instead (as S-DPO and DMPO do), whose log-probs are
then computed once, before the preference phase, because the adapter moves on from there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from recalign import io
from recalign.align.losses import LOSS_TYPES

Log = Callable[[str], None]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# AlignConfig fields that change where and how safely a run trains, not what it learns.
RESOURCE_FIELDS = ("num_workers", "use_gpu", "cpus_per_worker", "max_failures", "checkpoints_to_keep",
                   "checkpoint_every")


@dataclass
class AlignConfig:
    loss_type: str = "sdpo"  # dpo (mean of the K pairwise losses) | dmpo | sdpo
    beta: float = 1.0  # implicit-reward scale; S-DPO uses 1.0, DPO papers often 0.1
    num_negatives: int = 3  # K rejected completions per prompt (the first K of each pairs row)
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (scale = lora_alpha / lora_r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    target_modules: list[str] = field(default_factory=lambda: [  # modules that get a LoRA adapter
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lr: float = 1e-4  # AdamW learning rate of the preference phase
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up (optimizer steps) at the start of each phase
    max_grad_norm: float = 1.0  # gradient clipping; 0 = off
    epochs: int = 1  # preference epochs over the pairs
    max_steps: int = 0  # > 0: preference optimizer steps instead of `epochs`
    max_examples: int = 0  # > 0: train on a seeded random subset of this many pairs (0 = every pair)
    batch_size: int = 2  # examples per worker micro-batch (each has 1 + K completions)
    grad_accum: int = 1  # micro-batches per optimizer step
    sft_epochs: int = 0  # SFT warm-up epochs on the chosen completions before the preference phase
    sft_max_steps: int = 0  # > 0: SFT optimizer steps instead of `sft_epochs`
    sft_lr: float = 1e-4  # AdamW learning rate of the SFT warm-up
    max_prompt_tokens: int = 1536  # longer prompts keep their end (the assistant header)
    max_completion_tokens: int = 256  # longer completions keep their start
    prompt_sharing: str = "packed"  # prompt encoded once for its 1 + K completions: packed (block mask) |
    #   kv_cache (expanded KV; for attention kernels without 4D masks) | none (K + 1 full sequences)
    precompute_reference: bool = False  # reference log-probs once before the preference phase, not every step
    dtype: str = "auto"  # model weights: auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16
    mixed_precision: str = "no"  # bf16: matmuls under torch.autocast in bfloat16, weights stay in `dtype` (~1.9x
    #   the fp32 matmul rate on CPUs with AVX512-BF16); no: everything in `dtype`
    checkpoint_every: int = 50  # optimizer steps between adapter checkpoints (the last step always checkpoints)
    checkpoints_to_keep: int = 2  # checkpoints kept in the run storage
    seed: int = 0  # LoRA init and data order
    num_workers: int = 2  # Ray Train workers (DDP)
    use_gpu: bool = False  # one GPU per worker, NCCL; else gloo on CPU
    cpus_per_worker: float = 1.0  # CPU workers' Ray resources (and torch threads)
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.prompt_sharing not in ("packed", "kv_cache", "none"):
            raise ValueError(f"prompt_sharing must be packed, kv_cache or none, got {self.prompt_sharing!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be no or bf16, got {self.mixed_precision!r}")
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {self.max_examples}")
        for name in ("num_negatives", "batch_size", "grad_accum", "checkpoint_every", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 1 and self.max_steps < 1 and self.sft_epochs < 1 and self.sft_max_steps < 1:
            raise ValueError("set epochs >= 1 or max_steps >= 1 (epochs=0 and max_steps=0 with an SFT warm-up "
                             "trains an SFT-only policy)")


@dataclass
class AlignSpec:
    """What every worker needs; sent once through train_loop_config."""

    cfg: AlignConfig
    model_path: str  # Hugging Face folder of the base causal LM
    pairs_uris: list[str]  # pairs/<path>.parquet files, concatenated
    tensorboard_dir: str = ""  # rank 0's live event dir; empty = a worker-local temp dir
    init_adapter: str = ""  # LoRA adapter folder the policy starts from (and the reference is); empty = fresh LoRA


@dataclass
class CrashOnce:
    """Fault injection: the worker of `rank` exits hard (os._exit) after optimizer step `step`, once.

    `marker` (a path every worker can see) records that it happened, so the restarted worker group
    trains on. `delay_s` waits before the exit: Ray Train's controller collects reports (and so
    registers checkpoints) every 2 s, and a checkpoint reported just before a crash may be missed,
    in which case the run resumes from the one before. Used by the resume test and for chaos runs.
    """

    marker: str
    step: int
    rank: int = 0
    delay_s: float = 0.0

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank and not os.path.exists(self.marker):
            with open(self.marker, "w") as out:
                out.write(f"worker {rank} killed after step {step} at {time.time()}\n")
            time.sleep(self.delay_s)
            os._exit(1)


def train_policy(cfg: AlignConfig, model_path: str, pairs_uris: list[str], out_dir: str, storage_path: str,
                 name: str, hooks: list[Callable[[int, int], None]] | None = None, log: Log = print,
                 init_adapter: str = "") -> dict[str, Any]:
    """Train a LoRA policy on the pairs under a TorchTrainer; publish it to `out_dir`; return metrics.

    `name` + `storage_path` identify the Ray Train run (checkpoints, TensorBoard): a re-run with the
    same pair resumes from its last checkpoint, so callers put a config fingerprint in the name.
    `hooks` are called on every worker after every optimizer step as hook(step, rank).
    `init_adapter` (a published SFT policy, say) is where the LoRA weights start; the reference policy is
    then that adapter, not the bare base model.
    out_dir gets adapter_config.json + adapter_model.safetensors (PeftModel.from_pretrained),
    metrics.json (summary and per-step history) and tensorboard/.
    """
    from recalign.align.loop import train_loop
    from recalign.pairs.read import load_pairs
    from recalign.distributed import fit_torch_trainer

    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise FileNotFoundError(f"{model_path}: not a Hugging Face model folder (config.json missing)")
    # Fail here, not in every worker.
    num_examples = len(load_pairs(pairs_uris, cfg.num_negatives, cfg.max_examples, cfg.seed))
    if init_adapter:
        check_adapter(init_adapter, cfg)
    tb_dir = io.join(storage_path, name, "tensorboard") if "://" not in storage_path else ""
    if init_adapter and io.is_local(init_adapter):
        init_adapter = os.path.abspath(init_adapter)  # workers may run in another directory
    spec = AlignSpec(cfg, os.path.abspath(model_path), list(pairs_uris), tb_dir, init_adapter)
    label = cfg.loss_type if cfg.epochs or cfg.max_steps else "sft"
    log(f"[align/{label}] {num_examples} examples, K={cfg.num_negatives}, {cfg.num_workers} workers, "
        f"run {name} in {storage_path}")
    start = time.time()
    result = fit_torch_trainer(train_loop, {"spec": spec, "hooks": list(hooks or [])}, cfg, storage_path, name,
                               f"alignment run {name}")
    with result.checkpoint.as_directory() as ckpt_dir:
        summary = _summary(ckpt_dir, spec, num_examples, time.time() - start)
        publish(ckpt_dir, out_dir, summary)
    final = summary["final"]
    log(f"[align/{label}] {summary['steps']} steps: loss {final.get('loss', float('nan')):.4f}, "
        f"reward accuracy {final.get('reward_accuracy', float('nan')):.3f}, started at steps {summary['starts']}")
    return summary


def check_adapter(adapter_dir: str, cfg: AlignConfig) -> None:
    """An init adapter must have the LoRA shape `cfg` asks for, or its weights would not fit (or be ignored).
    `adapter_dir` may be on any filesystem the run storage supports."""
    path = io.join(adapter_dir, "adapter_config.json")
    if not all(io.exists(io.join(adapter_dir, f)) for f in ADAPTER_FILES):
        raise FileNotFoundError(f"{adapter_dir}: not a PEFT adapter folder (needs {', '.join(ADAPTER_FILES)})")
    saved = io.read_json(path)
    wanted = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)}
    found = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
             "target_modules": sorted(saved.get("target_modules") or [])}
    diff = [k for k in wanted if wanted[k] != found[k]]
    if diff:
        raise ValueError(f"{path}: {', '.join(f'{k}={found[k]!r}' for k in diff)} but align asks for "
                         f"{', '.join(f'{k}={wanted[k]!r}' for k in diff)}")


def _summary(ckpt_dir: str, spec: AlignSpec, num_examples: int, seconds: float) -> dict[str, Any]:
    import torch

    state = torch.load(os.path.join(ckpt_dir, "state.pt"), map_location="cpu", weights_only=False)
    history = state["history"]
    pref = [h for h in history if h["phase"] == "preference"]
    last = pref[-10:]
    mean_last = {k: sum(h[k] for h in last) / len(last) for k in last[0] if k not in ("phase", "step")} if last else {}
    return {
        "loss_type": spec.cfg.loss_type, "num_negatives": spec.cfg.num_negatives, "beta": spec.cfg.beta,
        "examples": num_examples, "steps": state["step"], "sft_steps": state["sft_steps"],
        "starts": state["starts"], "world_size": state["world_size"], "seconds": seconds,
        "final": pref[-1] if pref else (history[-1] if history else {}), "mean_last_10": mean_last,
        "model_path": spec.model_path, "init_adapter": spec.init_adapter, "pairs": spec.pairs_uris,
        "config": asdict(spec.cfg), "history": history,
    }


def publish(ckpt_dir: str, out_dir: str, summary: dict[str, Any]) -> None:
    """Adapter + metrics.json + tensorboard/ into out_dir, atomically: a full sibling, then a rename."""
    with tempfile.TemporaryDirectory() as staging:
        for fname in ADAPTER_FILES:
            shutil.copy2(os.path.join(ckpt_dir, "adapter", fname), os.path.join(staging, fname))
        if os.path.isdir(os.path.join(ckpt_dir, "tensorboard")):
            shutil.copytree(os.path.join(ckpt_dir, "tensorboard"), os.path.join(staging, "tensorboard"))
        io.write_json(summary, os.path.join(staging, "metrics.json"))
        _replace_dir(staging, out_dir)


def _replace_dir(local_dir: str, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = io.resolve(uri)
    parent, _, leaf = path.rstrip("/").rpartition("/")
    tmp = f"{parent}/.tmp-{os.urandom(4).hex()}-{leaf}"
    fs.create_dir(parent, recursive=True)
    pafs.copy_files(local_dir, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    fs.move(tmp, path)


def policy_key(cfg: AlignConfig, model_path: str, pairs_uris: list[str], init_adapter: str = "") -> str:
    """Fingerprint of everything the published policy depends on (not workers or fault tolerance)."""
    from recalign.config import fingerprint

    train = {k: v for k, v in asdict(cfg).items() if k not in RESOURCE_FIELDS}
    model = hashlib.sha256(io.read_bytes(io.join(os.path.abspath(model_path), "config.json"))).hexdigest()
    pairs = [hashlib.sha256(io.read_bytes(u)).hexdigest() for u in pairs_uris]
    init = hashlib.sha256(io.read_bytes(io.join(init_adapter, ADAPTER_FILES[1]))).hexdigest() if init_adapter else ""
    return fingerprint({"train": train, "model": model, "pairs": pairs, "init": init})


def policy_stage(run, cfg: AlignConfig, model_path: str, pairs_uris: list[str], log: Log = print,
                 force: bool = False, name: str = "", init_adapter: str = "") -> dict[str, Any]:
    """`runs/<name>/policy/<name or loss_type>/`, skipped when up to date; Ray storage under `runs/<name>/ray`.

    `name` may hold a slash (`rerank/sft+sdpo`): the pipeline keeps one folder per path and policy.
    """
    from recalign import stage

    label = name or cfg.loss_type
    key = policy_key(cfg, model_path, pairs_uris, init_adapter)
    out_dir = run.dir("policy", *label.split("/"))

    def train() -> dict[str, Any]:
        summary = train_policy(cfg, model_path, pairs_uris, out_dir, storage_path=run.dir("ray"),
                               name=f"policy-{label.replace('/', '-').replace('+', '-')}-{key}", log=log,
                               init_adapter=init_adapter)
        return {k: summary[k] for k in ("loss_type", "num_negatives", "examples", "steps", "sft_steps", "starts",
                                        "seconds", "final")}

    return stage.run(f"policy/{label}", out_dir, key, train, log, force)
