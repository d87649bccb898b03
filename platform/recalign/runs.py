"""Where a run's artifacts live: `<root>/<name>/<stage>/...` on any pyarrow filesystem."""

from __future__ import annotations

from dataclasses import dataclass

from recalign import io


@dataclass
class RunSpec:
    name: str = "demo"  # run name: every stage of a pipeline writes under <root>/<name>/
    root: str = "runs"  # local folder or filesystem URI (s3://bucket/runs, gs://...)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"run.name must be a non-empty name without '/', got {self.name!r}")

    def dir(self, *parts: str) -> str:
        return io.join(self.root if "://" in self.root else _abs(self.root), self.name, *parts)


def _abs(path: str) -> str:
    import os

    return os.path.abspath(path)
