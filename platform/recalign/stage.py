"""Skip-if-unchanged stages: a stage's output dir holds `_stage.json` once the stage finished.

The marker stores the fingerprint of everything the stage's output depends on (its config and
the fingerprints of its inputs). A re-run with the same fingerprint skips the stage; a changed
config reruns it; a crash before the marker means the stage reruns (its writes are atomic, and
its Ray Train runs resume from their own checkpoints).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from recalign import io

MARKER = "_stage.json"


def done(out_dir: str, key: str) -> dict[str, Any] | None:
    """The stored summary if the stage finished with this fingerprint, else None."""
    uri = io.join(out_dir, MARKER)
    if not io.exists(uri):
        return None
    marker = io.read_json(uri)
    return marker.get("summary", {}) if marker.get("fingerprint") == key else None


def run(name: str, out_dir: str, key: str, fn: Callable[[], dict[str, Any]], log: Callable[[str], None] = print,
        force: bool = False) -> dict[str, Any]:
    """Run `fn` unless `out_dir` already holds its output for fingerprint `key`."""
    if not force:
        summary = done(out_dir, key)
        if summary is not None:
            log(f"[{name}] up to date ({key}), skipped")
            return summary
    log(f"[{name}] running ({key})")
    start = time.time()
    uri = io.join(out_dir, MARKER)
    if io.exists(uri):
        io.delete(uri)  # stale marker: the outputs are about to change
    summary = fn() or {}
    seconds = time.time() - start
    io.write_json({"stage": name, "fingerprint": key, "seconds": seconds, "summary": summary}, uri)
    log(f"[{name}] done in {seconds:.0f}s")
    return summary


def fingerprint_of(out_dir: str) -> str:
    """The fingerprint a finished stage recorded; downstream stages fold it into their own."""
    uri = io.join(out_dir, MARKER)
    if not io.exists(uri):
        raise FileNotFoundError(f"{out_dir}: stage output missing or unfinished (no {MARKER}); run that stage first")
    return io.read_json(uri)["fingerprint"]
