"""The per-worker training loop of `recalign.align.trainer.train_policy` (runs under TorchTrainer), and
`AlignSpec`, what every worker is sent.

One optimizer step = `gradient_accumulation_steps` micro-batches per worker, gradients averaged by DDP. Steps
0 .. sft_steps-1 are the optional SFT warm-up (listwise: cross-entropy of a softmax over each example's
completions with the chosen one the label; or the token-mean NLL of the chosen), the rest the preference
phase. The data order is a pure function of (seed, phase, epoch), so a restarted
worker group continues exactly where the last checkpoint left off.

A checkpoint holds the adapter (PEFT format), the optimizer, the step, the precomputed reference
log-probs, the per-step history and the TensorBoard events; rank 0 writes it and every worker
reports (Ray Train's report is a barrier). At each checkpoint the workers compare a checksum of
their LoRA weights and fail loudly if they diverged. When the driver opened an MLflow run
(`AlignSpec.mlflow`), rank 0 logs into it at each checkpoint the step records since the last one, so a
resumed run shows each step once, as TensorBoard does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from recalign import io
from recalign.align.config import AlignConfig
from recalign.align.logprobs import SCORERS, PolicyScorer, collate, encode_example
from recalign.align.losses import listwise_loss, preference_loss, reward_stats
from recalign.align.records import PREFERENCE, SFT, add_sums, global_record, log_scalars, scalars, summary_writer
from recalign.distributed import check_in_sync
from recalign.llm.collab import CollabLM, peft_of
from recalign.tracking import MlflowRun, worker_session


@dataclass
class AlignSpec:
    """What every worker needs; sent once through train_loop_config."""

    cfg: AlignConfig
    model_path: str  # Hugging Face folder of the base causal LM
    pairs_uris: list[str]  # pairs/<path>.parquet files, concatenated
    tensorboard_dir: str = ""  # rank 0's live event dir; empty = a worker-local temp dir
    init_adapter: str = ""  # LoRA adapter folder the policy starts from (and the reference is); empty = fresh LoRA
    mlflow: MlflowRun | None = None  # the driver's MLflow run that rank 0 logs params and metrics into; None = off
    item_table: str = ""  # SASRec model folder whose item embeddings feed the prompts' collaborative tokens; "" = none


@dataclass
class Plan:
    """Step counts and the deterministic data order."""

    num_examples: int
    steps_per_epoch: int
    sft_steps: int
    preference_steps: int
    global_batch: int  # examples per optimizer step over all workers

    @classmethod
    def build(cls, num_examples: int, cfg: AlignConfig, world: int) -> "Plan":
        global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
        per_epoch = max(1, num_examples // global_batch)  # the remainder waits for the next epoch's shuffle
        sft = cfg.sft_max_steps or cfg.sft_num_train_epochs * per_epoch
        pref = cfg.max_steps or cfg.num_train_epochs * per_epoch
        return cls(num_examples, per_epoch, sft, pref, global_batch)

    @property
    def total_steps(self) -> int:
        return self.sft_steps + self.preference_steps

    def phase(self, step: int) -> str:
        return SFT if step < self.sft_steps else PREFERENCE

    def phase_step(self, step: int) -> int:
        return step if step < self.sft_steps else step - self.sft_steps

    def learning_rate(self, step: int, cfg: AlignConfig) -> float:
        """The phase's learning rate with a linear warm-up over its first cfg.warmup_steps steps."""
        base = cfg.sft_learning_rate if self.phase(step) == SFT else cfg.learning_rate
        return base * min(1.0, (self.phase_step(step) + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else base

    def micro_batches(self, step: int, rank: int, world: int, grad_accum: int, seed: int) -> list[np.ndarray]:
        """This worker's example indices for optimizer step `step`, one array per micro-batch."""
        phase = self.phase(step)
        epoch, within = divmod(self.phase_step(step), self.steps_per_epoch)
        order = np.random.default_rng([seed, int(phase == PREFERENCE), epoch]).permutation(self.num_examples)
        order = np.resize(order, self.global_batch * (within + 1))  # cycles when there are fewer examples
        mine = order[within * self.global_batch:(within + 1) * self.global_batch][rank::world]
        return np.array_split(mine, grad_accum)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    phase: str = ""  # phase of the optimizer state below
    optimizer: dict | None = None
    reference: torch.Tensor | None = None  # (num_examples, 1 + K) precomputed reference log-probs
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per step (global metrics)
    starts: list[int] = field(default_factory=list)  # step at which each (re)start of the workers began


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop. config: {"spec": AlignSpec, "hooks": [callable(step, rank)]}."""
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    from recalign.llm.store import local_model
    from recalign.pairs.read import load_pairs

    spec: AlignSpec = config["spec"]
    hooks = config.get("hooks") or []
    cfg = spec.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)

    model_path = local_model(spec.model_path)  # a model on shared storage: this node's cached copy
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = encode_pairs(tokenizer, load_pairs(spec.pairs_uris, cfg.negatives_loaded, cfg.max_examples, cfg.seed),
                            cfg)
    model = build_policy(model_path, cfg, device, spec.init_adapter, spec.item_table)
    tb_dir = spec.tensorboard_dir or os.path.join(tempfile.gettempdir(), f"recalign-tb-{os.getpid()}")
    state = restore(ray.train.get_checkpoint(), model, tb_dir if rank == 0 else None)
    state.starts.append(state.step)
    tracker = worker_session(spec.mlflow, asdict(cfg)) if rank == 0 and spec.mlflow else None
    logged = len(state.history)  # the attempt that wrote the checkpoint logged these
    scorer = ray.train.torch.prepare_model(PolicyScorer(model, cfg.prompt_sharing),
                                           parallel_strategy_kwargs={"find_unused_parameters": False})
    plan = Plan.build(len(examples), cfg, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    writer = summary_writer(tb_dir, state.step) if rank == 0 else None

    if state.step >= plan.total_steps:  # a re-run of a finished run: report its state again
        _report(state, plan, model, rank, world, tb_dir)
    while state.step < plan.total_steps:
        phase = plan.phase(state.step)
        if optimizer is None or state.phase != phase:
            optimizer = torch.optim.AdamW(trainable, lr=cfg.sft_learning_rate if phase == SFT else cfg.learning_rate,
                                          weight_decay=cfg.weight_decay)
            if state.phase == phase and state.optimizer is not None:
                optimizer.load_state_dict(state.optimizer)
            state.phase = phase
        # The reference is the policy as the preference phase starts: the base model (adapter off), or the
        # SFT-warmed / initial adapter, whose log-probs must be taken now because the adapter moves on.
        # A trained projector also moves the reference's soft tokens: it is taken once, as the phase starts.
        starts_from_adapter = plan.sft_steps > 0 or bool(spec.init_adapter)
        fixed = cfg.precompute_ref_log_probs or starts_from_adapter or bool(spec.item_table)
        if phase == PREFERENCE and state.reference is None and fixed:
            state.reference = precompute_reference(model, examples, cfg, pad_id, rank, world, device,
                                                   adapter=starts_from_adapter)
        lr = plan.learning_rate(state.step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        micro = plan.micro_batches(state.step, rank, world, cfg.gradient_accumulation_steps, cfg.seed)
        sums = train_step(scorer, model, optimizer, examples, micro, cfg, pad_id, device, phase, state.reference,
                          trainable)
        record = global_record(sums, time.perf_counter() - start, phase, state.step + 1, lr, device)
        state.step += 1
        state.history.append(record)
        if rank == 0 and (state.step % max(1, plan.total_steps // 10) == 0 or state.step == plan.total_steps):
            accuracy = (f", reward accuracy {record['reward_accuracy']:.2f}" if phase == PREFERENCE else
                        f", top-1 {record['top1_accuracy']:.2f}" if "top1_accuracy" in record else "")
            # Ray Train's own logger reaches the driver once; a print from a Train worker arrives twice.
            logging.getLogger("ray.train").info(
                f"[align] step {state.step}/{plan.total_steps} ({phase}): loss {record['loss']:.4f}{accuracy}, "
                f"{record['step_seconds']:.1f}s/step")
        if writer is not None:
            log_scalars(writer, record)
        if state.step % cfg.save_steps == 0 or state.step == plan.total_steps or state.step == plan.sft_steps:
            state.optimizer = optimizer.state_dict()
            if writer is not None:
                writer.flush()
            if tracker is not None:  # at checkpoints: steps a crashed attempt took after its last one stay out
                for entry in state.history[logged:]:
                    tracker.log_metrics(scalars(entry), step=entry["step"])
                logged = len(state.history)
            _report(state, plan, model, rank, world, tb_dir)
        for hook in hooks:
            hook(state.step, rank)
    if writer is not None:
        writer.close()
    if tracker is not None:
        tracker.end_run()


def encode_pairs(tokenizer, pairs, cfg: AlignConfig) -> list:
    """PreferenceExamples -> EncodedExamples (prompt ids, [chosen, *rejected] ids). Knowledge analyses end with
    EOS; re-rank completions are a candidate's letter alone, so the loss is that letter's log-probability."""
    return [encode_example(tokenizer, e.prompt, [e.chosen, *e.rejected], cfg.max_prompt_length,
                           cfg.max_completion_length, add_eos=e.path != "rerank") for e in pairs]


def build_policy(model_path: str, cfg: AlignConfig, device: torch.device, init_adapter: str = "",
                 item_table: str = ""):
    """The base causal LM with a fresh LoRA adapter (seeded), or the weights of `init_adapter`, on `device`; with
    `item_table` (a SASRec folder), a `CollabLM` around it whose projector is fresh or `init_adapter`'s."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load as load_safetensors
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base, lora)
    if init_adapter:  # same LoRA shape (checked by the driver), so the saved weights load one to one
        weights = load_safetensors(io.read_bytes(io.join(init_adapter, "adapter_model.safetensors")))
        result = set_peft_model_state_dict(model, weights)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(f"{init_adapter}: adapter does not fit the LoRA modules (unexpected "
                             f"{result.unexpected_keys[:3]}, missing {missing[:3]})")
    model = model.to(device)
    if not item_table:
        return model
    from recalign.recsys.train import load_model

    collab = CollabLM.fresh(model, load_model(item_table).item_emb.weight.detach(), cfg.seed)
    if init_adapter:
        with io.local_copy(init_adapter) as local:
            collab.load_projector(local)
    return collab


def train_step(scorer, model, optimizer, examples, micro_batches, cfg: AlignConfig, pad_id: int, device,
               phase: str, reference: torch.Tensor | None, trainable: list[torch.Tensor]) -> dict[str, float]:
    """One optimizer step over this worker's micro-batches; returns this worker's metric sums."""
    model.train()
    sums: dict[str, float] = {}
    for i, rows in enumerate(micro_batches):
        with autocast(cfg, device):
            add_sums(sums, **_micro_batch(scorer, model, examples, rows, i == len(micro_batches) - 1,
                                      len(micro_batches), cfg, pad_id, device, phase, reference))
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


def autocast(cfg: AlignConfig, device):
    """bf16 autocast when cfg.bf16 asks for it (weights and gradients keep their dtype)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)


def _micro_batch(scorer, model, examples, rows, last: bool, num_micro: int, cfg: AlignConfig, pad_id: int, device,
                 phase: str, reference: torch.Tensor | None) -> dict[str, float]:
    """Forward and backward of one micro-batch (1/num_micro of the step's loss); returns its metric sums."""
    # SFT: the chosen alone (nll) or every completion the example has (listwise); preference: 1 + K.
    width = (1 if cfg.sft_loss == "nll" else None) if phase == SFT else cfg.num_negatives + 1
    batch = collate([examples[j] for j in rows], pad_id, width).to(device)
    sums = {"sequence_tokens": float(batch.sequence_tokens()), "examples": float(len(rows))}
    # Gradients are all-reduced once per optimizer step, on the last micro-batch.
    sync = contextlib.nullcontext() if last or not hasattr(scorer, "no_sync") else scorer.no_sync()
    with sync:
        logps = scorer(**batch.tensors())  # (b, 1 + K); in SFT (b, 1) or (b, every completion)
        if phase == SFT and cfg.sft_loss == "listwise":
            losses, top1 = listwise_loss(logps, batch.present())
            loss = losses.mean()
            sums.update(loss_sum=losses.sum().item(), top1_sum=top1.sum().item())
        elif phase == SFT:
            loss = -logps[:, 0].sum() / batch.completion_mask[:, 0].sum()  # token-mean NLL of the chosen
            sums["loss_sum"] = loss.item() * len(rows)
        else:
            ref = (reference[torch.as_tensor(rows)].to(device) if reference is not None
                   else reference_logps(model, batch, cfg.prompt_sharing))
            present = batch.present()[:, 1:]  # (b, K): a row with fewer negatives is padded, its extras masked
            losses, chosen_rewards, rejected_rewards = preference_loss(
                logps[:, 0], logps[:, 1:], ref[:, 0].to(logps.dtype), ref[:, 1:].to(logps.dtype), cfg.beta,
                cfg.loss_type, present)
            loss = losses.mean()
            sums["loss_sum"] = losses.sum().item()
            stats = reward_stats(chosen_rewards, rejected_rewards, present)
            sums.update({f"{k}_sum": v.sum().item() for k, v in stats.items()})
        (loss / num_micro).backward()
    return sums


@torch.no_grad()
def reference_logps(model, batch, prompt_sharing: str = "packed") -> torch.Tensor:
    """(B, 1 + K) log-probs of the base model: the PEFT adapter disabled, no gradient."""
    with model.disable_adapter():
        return SCORERS[prompt_sharing](model, **batch.tensors())


@torch.no_grad()
def precompute_reference(model, examples, cfg: AlignConfig, pad_id: int, rank: int, world: int, device,
                         adapter: bool) -> torch.Tensor:
    """(num_examples, 1 + K) reference log-probs, each worker scoring every world-th example.

    adapter=True scores with the current adapter (the SFT-warmed policy), else the base model.
    """
    import torch.distributed as dist

    was_training = model.training
    model.eval()  # no LoRA dropout in the reference
    out = torch.zeros((len(examples), cfg.num_negatives + 1), dtype=torch.float64)
    mine = np.arange(rank, len(examples), world)
    for start in range(0, len(mine), cfg.per_device_train_batch_size):
        rows = mine[start:start + cfg.per_device_train_batch_size]
        batch = collate([examples[j] for j in rows], pad_id, cfg.num_negatives + 1).to(device)
        with contextlib.nullcontext() if adapter else model.disable_adapter(), autocast(cfg, device):
            out[torch.as_tensor(rows)] = SCORERS[cfg.prompt_sharing](model, **batch.tensors()).double().cpu()
    if dist.is_available() and dist.is_initialized():
        out = out.to(device)
        dist.all_reduce(out)  # each row was filled by exactly one worker, zeros elsewhere
    model.train(was_training)
    return out.cpu()


def restore(checkpoint, model, tb_dir: str | None) -> TrainState:
    """Load the adapter and the trainer state of a checkpoint (a fresh state without one)."""
    if checkpoint is None:
        return TrainState()
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    with checkpoint.as_directory() as ckpt_dir:
        weights = load_file(os.path.join(ckpt_dir, "adapter", "adapter_model.safetensors"))
        set_peft_model_state_dict(peft_of(model), weights)
        if isinstance(model, CollabLM):
            model.load_projector(os.path.join(ckpt_dir, "adapter"))
        saved = torch.load(os.path.join(ckpt_dir, "state.pt"), map_location="cpu", weights_only=False)
        events = os.path.join(ckpt_dir, "tensorboard")
        if tb_dir and os.path.isdir(events):  # a worker on another node starts from the checkpoint's events
            shutil.copytree(events, tb_dir, dirs_exist_ok=True)
    return TrainState(step=saved["step"], phase=saved["phase"], optimizer=saved["optimizer"],
                      reference=saved["reference"], history=saved["history"], starts=saved["starts"])


def _report(state: TrainState, plan: Plan, model, rank: int, world: int, tb_dir: str) -> None:
    import ray.train

    divergence = check_in_sync(model, f"at step {state.step}")
    metrics = {**(state.history[-1] if state.history else {}), "step": state.step, "param_divergence": divergence,
               "world_size": world}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "adapter"))
        torch.save({"step": state.step, "phase": state.phase, "optimizer": state.optimizer,
                    "reference": state.reference, "history": state.history, "starts": state.starts,
                    "sft_steps": plan.sft_steps, "world_size": world}, os.path.join(tmp, "state.pt"))
        if os.path.isdir(tb_dir):
            shutil.copytree(tb_dir, os.path.join(tmp, "tensorboard"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
