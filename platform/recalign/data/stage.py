"""The data stage: the canonical dataset of a run under `<run>/data/` (see `recalign.data.dataset`)."""

from __future__ import annotations

from recalign.config import fingerprint
from recalign.data.dataset import DataConfig, prepare
from recalign.runs import Log, RunSpec, run_stage


def prepare_stage(run: RunSpec, data_cfg: DataConfig, log: Log = print, force: bool = False) -> dict:
    """Build `<run>/data/` from the configured source; skipped when it holds the same config's output."""
    def build() -> dict:
        meta = prepare(data_cfg, run.dir("data"))
        log(f"[data] {meta['name']}: {meta['num_users']} users, {meta['num_items']} items, "
            f"{meta['num_interactions']} interactions ({meta['dropped_users']} users dropped)")
        return {k: v for k, v in meta.items() if k != "config"}

    return run_stage("data", run.dir("data"), fingerprint(data_cfg), build, log, force)
