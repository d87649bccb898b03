"""Preference alignment (DPO, DMPO, S-DPO with K negatives) of a LoRA policy under Ray Train.

`train_policy` is the driver: it checks the inputs, runs `recalign.align.loop.train_loop` on every
worker of a TorchTrainer (DDP: gloo on CPU, NCCL on GPU; checkpoints in the run storage; restarts
from the last checkpoint after a worker dies) and publishes the final LoRA adapter (standard PEFT
format) with metrics.json and the TensorBoard events to `out_dir` atomically; with a tracking target it
also logs the policy to MLflow. It never calls ray.init, so it runs from a job, a pipeline stage or
inside a Ray Tune trial.

The reference policy is the base model with the adapter disabled (no second copy of the weights).
After an SFT warm-up it is the warmed-up policy instead (as S-DPO and DMPO do), whose log-probs are
then computed once, before the preference phase, because the adapter moves on from there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from recalign import io
from recalign.align.config import AlignConfig
from recalign.align.loop import AlignSpec
from recalign.errors import MissingInputError
from recalign.llm.collab import COLLAB_FILE
from recalign.runs import Log
from recalign.tracking import MlflowRun, MlflowTarget, connect, end_run, start_run

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


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
                 init_adapter: str = "", tracking: MlflowTarget | None = None, item_table: str = "") -> dict[str, Any]:
    """Train a LoRA policy on the pairs under a TorchTrainer; publish it to `out_dir`; return metrics.

    `name` + `storage_path` identify the Ray Train run (checkpoints, TensorBoard): a re-run with the
    same pair resumes from its last checkpoint, so callers put a config fingerprint in the name.
    `hooks` are called on every worker after every optimizer step as hook(step, rank).
    `init_adapter` (a published SFT policy, say) is where the LoRA weights start; the reference policy is
    then that adapter, not the bare base model.
    `item_table` (a SASRec folder): the prompts' collaborative tokens (`recalign.llm.collab`) embed its items
    through a projector trained with the LoRA weights and published beside them (collab.safetensors).
    out_dir gets adapter_config.json + adapter_model.safetensors (PeftModel.from_pretrained),
    metrics.json (summary and per-step history) and tensorboard/.
    `tracking`: the MLflow run of `name` (one per Ray Train run, kept across its restarts and re-runs) gets
    the align config as params and the step metrics from rank 0 (setup_mlflow), and the published adapter
    (adapter/) and metrics.json from here.
    """
    from recalign.align.loop import train_loop
    from recalign.distributed import fit_torch_trainer
    from recalign.pairs.read import load_pairs

    # A model published on shared storage (a URI) is pulled by each worker into its node's cache (llm.store).
    if "://" not in model_path and not os.path.isfile(os.path.join(model_path, "config.json")):
        raise MissingInputError(f"{model_path}: not a Hugging Face model folder (config.json missing)")
    # Fail here, not in every worker.
    num_examples = len(load_pairs(pairs_uris, cfg.negatives_loaded, cfg.max_examples, cfg.seed))
    if init_adapter:
        check_adapter(init_adapter, cfg)
        if item_table and not io.exists(io.join(init_adapter, COLLAB_FILE)):
            raise MissingInputError(f"{init_adapter}: no {COLLAB_FILE}; a policy with collaborative tokens starts "
                                    "from one trained with them (or from none)")
    tb_dir = io.join(storage_path, name, "tensorboard") if "://" not in storage_path else ""
    if init_adapter and io.is_local(init_adapter):
        init_adapter = os.path.abspath(init_adapter)  # workers may run in another directory
    model_path = model_path if "://" in model_path else os.path.abspath(model_path)
    label = cfg.loss_type if cfg.num_train_epochs or cfg.max_steps else "sft"
    mlflow_run = start_run(tracking, name, {"label": label, "model_path": model_path,
                                            "init_adapter": init_adapter}) if tracking else None
    if item_table and io.is_local(item_table):
        item_table = os.path.abspath(item_table)
    spec = AlignSpec(cfg, model_path, list(pairs_uris), tb_dir, init_adapter, mlflow_run, item_table)
    log(f"[align/{label}] {num_examples} examples, K={cfg.num_negatives}, {cfg.num_workers} workers, "
        f"run {name} in {storage_path}" + (f", MLflow {tracking.tracking_uri}" if mlflow_run else ""))
    start = time.time()
    try:
        result = fit_torch_trainer(train_loop, {"spec": spec, "hooks": list(hooks or [])},
                                   num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                   cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures,
                                   num_to_keep=cfg.save_total_limit, storage_path=storage_path, run_name=name,
                                   what=f"alignment run {name}")
        with result.checkpoint.as_directory() as ckpt_dir:
            summary = _summary(ckpt_dir, spec, num_examples, time.time() - start)
            publish(ckpt_dir, out_dir, summary)
            if mlflow_run:
                _log_published(mlflow_run, ckpt_dir, summary)
    except BaseException:
        if mlflow_run:
            end_run(mlflow_run, "FAILED")
        raise
    final = summary["final"]
    log(f"[align/{label}] {summary['steps']} steps: loss {final.get('loss', float('nan')):.4f}, "
        f"reward accuracy {final.get('reward_accuracy', float('nan')):.3f}, started at steps {summary['starts']}")
    return summary


def adapter_files(adapter_dir: str) -> list[str]:
    """The files a published policy holds: the PEFT adapter, and the projector when it has collaborative tokens."""
    return [*ADAPTER_FILES, *([COLLAB_FILE] if os.path.exists(os.path.join(adapter_dir, COLLAB_FILE)) else [])]


def check_adapter(adapter_dir: str, cfg: AlignConfig) -> None:
    """An init adapter must have the LoRA shape `cfg` asks for, or its weights would not fit (or be ignored).
    `adapter_dir` may be on any filesystem the run storage supports."""
    path = io.join(adapter_dir, "adapter_config.json")
    if not all(io.exists(io.join(adapter_dir, f)) for f in ADAPTER_FILES):
        raise MissingInputError(f"{adapter_dir}: not a PEFT adapter folder (needs {', '.join(ADAPTER_FILES)})")
    saved = io.read_json(path)
    wanted = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.lora_target_modules)}
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
    """Adapter + metrics.json + tensorboard/ into out_dir (io.replace_dir: locally a full sibling, then a rename)."""
    with tempfile.TemporaryDirectory() as staging:
        for fname in adapter_files(os.path.join(ckpt_dir, "adapter")):
            shutil.copy2(os.path.join(ckpt_dir, "adapter", fname), os.path.join(staging, fname))
        if os.path.isdir(os.path.join(ckpt_dir, "tensorboard")):
            shutil.copytree(os.path.join(ckpt_dir, "tensorboard"), os.path.join(staging, "tensorboard"))
        io.write_json(summary, os.path.join(staging, "metrics.json"))
        io.replace_dir(staging, out_dir)


def _log_published(run: MlflowRun, ckpt_dir: str, summary: dict[str, Any]) -> None:
    """The published policy as artifacts of its MLflow run (adapter/: a PEFT folder; metrics.json), which ends."""
    mlflow_client = connect(run.tracking_uri)
    with tempfile.TemporaryDirectory() as staging:
        os.makedirs(os.path.join(staging, "adapter"))
        for fname in adapter_files(os.path.join(ckpt_dir, "adapter")):
            shutil.copy2(os.path.join(ckpt_dir, "adapter", fname), os.path.join(staging, "adapter", fname))
        io.write_json(summary, os.path.join(staging, "metrics.json"))
        mlflow_client.log_artifacts(run.run_id, staging)
    mlflow_client.set_terminated(run.run_id, status="FINISHED")
