"""Run storage and the plumbing every pipeline stage shares.

- `RunSpec`: where a run's artifacts live, `<root>/<name>/<stage>/...` on any pyarrow filesystem.
- Skip-if-unchanged stages (`run_stage`): a stage's output dir holds `_stage.json` once the stage
  finished, with the fingerprint of everything its output depends on (its config and the
  fingerprints of its inputs). A re-run with the same fingerprint skips the stage; a changed config
  reruns it; a crash before the marker means the stage reruns (its writes are atomic, and its Ray
  Train runs resume from their own checkpoints).
- Fingerprint keys: `learning_key` drops the settings that change where or how fast a stage runs,
  not what it makes (`INFRA_KEYS`); `input_key` is the fingerprint of an upstream stage's output.
- Dry runs (`dry_run`): `run_stage` reports what it would do (`WouldRun`) instead of doing it.
- Stage events (`stage_events`): who wants one line per stage (the pipeline's console) hears when a
  stage starts, is skipped, or is done.
- `slug`: a system or policy name as a file or run name. `Log`: what every stage logs with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from recalign import io
from recalign.config import option
from recalign.errors import MissingInputError

Log = Callable[[str], None]
MARKER = "_stage.json"
MODELS = "models"  # <run.root>/models: converted models shared by the runs of one root
# Config fields that change where, how fast or how safely a stage runs, not what it makes. They are left
# out of fingerprints, so changing them (more workers, another GPU, fewer kept checkpoints) reruns nothing.
INFRA_KEYS = frozenset({"num_workers", "use_gpu", "cpus_per_worker", "max_failures", "checkpoints_to_keep",
                        "save_total_limit", "save_steps", "eval_batch_size"})


@dataclass
class RunSpec:
    name: str = option("demo", "run name: every stage of a pipeline writes under <root>/<name>/")
    root: str = option("runs", "local folder or filesystem URI (s3://bucket/runs, gs://...)")

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"run.name must be a non-empty name without '/', got {self.name!r}")
        if self.name == MODELS:
            raise ValueError(f"run.name={MODELS!r} is where <run.root>/{MODELS} keeps converted models; pick another")

    def dir(self, *parts: str) -> str:
        return io.join(self.root if "://" in self.root else os.path.abspath(self.root), self.name, *parts)

    def models(self, models_dir: str = "") -> str:
        """Where named models are converted: `models_dir` when set; else `<root>/models` when the root is a URI
        or an absolute path (on a cluster: shared storage, beside the runs), else ./models."""
        if models_dir:
            return models_dir
        return io.join(self.root, MODELS) if "://" in self.root or os.path.isabs(self.root) else MODELS


def run_at(run_dir: str) -> RunSpec:
    """The run whose dir is `run_dir` (a path or URI): its parent is the root."""
    run_dir = run_dir.rstrip("/")
    if "://" in run_dir:
        root, _, name = run_dir.rpartition("/")
        return RunSpec(name=name, root=root)
    return RunSpec(name=os.path.basename(run_dir), root=os.path.dirname(run_dir) or ".")


def done(out_dir: str, key: str) -> dict[str, Any] | None:
    """The stored summary if the stage finished with this fingerprint, else None."""
    uri = io.join(out_dir, MARKER)
    if not io.exists(uri):
        return None
    marker = io.read_json(uri)
    return marker.get("summary", {}) if marker.get("fingerprint") == key else None


class WouldRun(Exception):
    """Raised by `run_stage` inside `dry_run()`: this stage would run, for `reason`; nothing was computed."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


_dry_run = False
_listeners: list[Callable[[str, str, float], None]] = []


@contextlib.contextmanager
def stage_events(listener: Callable[[str, str, float], None]) -> Iterator[None]:
    """Call `listener(stage, event, seconds)` for every `run_stage` in the block; event is "running",
    "skipped" (up to date) or "done" (seconds: how long it ran)."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def tell_stage(stage: str, event: str, seconds: float = 0.0) -> None:
    """Tell the `stage_events` listeners (run_stage does; a stage that always runs tells its own)."""
    for listener in list(_listeners):
        listener(stage, event, seconds)


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    """Inside the block `run_stage` computes nothing: an up-to-date stage returns its stored summary, any
    other raises WouldRun with the reason; and models are not converted or built (`dry_running`)."""
    global _dry_run
    previous, _dry_run = _dry_run, True
    try:
        yield
    finally:
        _dry_run = previous


def dry_running() -> bool:
    return _dry_run


def run_stage(name: str, out_dir: str, key: str, fn: Callable[[], dict[str, Any]], log: Log = print,
              force: bool = False) -> dict[str, Any]:
    """Run `fn` unless `out_dir` already holds its output for fingerprint `key`."""
    if _dry_run:
        return _planned(name, out_dir, key, force)
    if not force:
        summary = done(out_dir, key)
        if summary is not None:
            log(f"[{name}] up to date ({key}), skipped")
            tell_stage(name, "skipped")
            return summary
    log(f"[{name}] running ({key})")
    tell_stage(name, "running")
    start = time.time()
    uri = io.join(out_dir, MARKER)
    if io.exists(uri):
        io.delete(uri)  # stale marker: the outputs are about to change
    summary = fn() or {}
    seconds = time.time() - start
    io.write_json({"stage": name, "fingerprint": key, "seconds": seconds, "summary": summary}, uri)
    log(f"[{name}] done in {seconds:.0f}s")
    tell_stage(name, "done", seconds)
    return summary


def _planned(name: str, out_dir: str, key: str, force: bool) -> dict[str, Any]:
    """`run_stage` in a dry run: the stored summary when up to date (`done`), else WouldRun with the reason."""
    if force:
        raise WouldRun(name, "forced (force=[...])")
    summary = done(out_dir, key)
    if summary is not None:
        return summary
    uri = io.join(out_dir, MARKER)
    if not io.exists(uri):
        raise WouldRun(name, f"no finished output in {out_dir}")
    raise WouldRun(name, f"config or inputs changed since its last run (fingerprint "
                         f"{io.read_json(uri).get('fingerprint')} -> {key})")


def fingerprint_of(out_dir: str) -> str:
    """The fingerprint a finished stage recorded; downstream stages fold it into their own."""
    uri = io.join(out_dir, MARKER)
    if not io.exists(uri):
        raise MissingInputError(f"{out_dir}: stage output missing or unfinished (no {MARKER}); run that stage first")
    return io.read_json(uri)["fingerprint"]


def input_key(out_dir: str) -> str:
    """Fingerprint of an upstream output: its marker when it has one, else its files' names, sizes and
    mtimes (an output written by hand or by a standalone job)."""
    if io.exists(io.join(out_dir, MARKER)):
        return fingerprint_of(out_dir)
    import pyarrow.fs as pafs

    fs, path = io.resolve(out_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    listing = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    if not listing:
        raise MissingInputError(f"{out_dir}: empty or missing; run the stage that writes it first")
    return hashlib.sha256(repr(listing).encode()).hexdigest()[:16]


def learning_key(cfg: Any) -> dict[str, Any]:
    """A config as a dict without its INFRA_KEYS (nested configs included): what fingerprints hash."""
    values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return {k: learning_key(v) if isinstance(v, dict) else v for k, v in values.items() if k not in INFRA_KEYS}


def slug(name: str) -> str:
    """A system or policy name as a file or run name: 'llm sft+dpo' -> 'llm_sft-dpo', 'rerank/sft' -> 'rerank_sft'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("+", "-")).strip("_")
